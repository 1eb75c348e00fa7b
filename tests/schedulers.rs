//! The samplers and the torch-compatible generator against references made
//! by diffusers 0.42.1 and torch 2.15.0 (`fixtures/make_scheduler_fixtures.py`,
//! `fixtures/data/generate/`).
//!
//! Tolerances: the generator and every schedule (timesteps, init_noise_sigma,
//! the initial latent) are compared bit for bit. Step outputs are compared
//! within 5e-7 of the sample's largest magnitude, because torch's CPU `sqrt`,
//! `log` and `exp` are MKL's high-accuracy ones (up to 0.56 ulp, not
//! correctly rounded) while spm's are IEEE, so a step's scalar coefficient
//! can differ by one ulp (6e-8 relative); the largest difference seen is
//! 2.7e-7. Everything else in a step is bit-identical, which
//! `most_step_outputs_are_bit_identical_to_diffusers` checks.

use std::path::PathBuf;

use clap::ValueEnum;
use serde_json::Value;
use spm::model::noise::{NormalKernel, TorchRng};
use spm::model::scheduler::{build, Sampler, Scheduler, SchedulerConfig};

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/data/generate")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn numel(shape: &Value) -> usize {
    shape
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .product()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Per-step tolerance, relative to the largest magnitude of the reference
/// (see the module doc for why).
const STEP_TOL: f64 = 5e-7;
/// A whole run on spm's own outputs: the per-step differences add up over
/// 30 steps at most; the largest seen is 3.8e-7.
const RUN_TOL: f64 = 1e-6;

fn max_rel_diff(ours: &[f32], theirs: &[f32]) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs
        .iter()
        .fold(0f64, |m, x| m.max(x.abs() as f64))
        .max(1e-30);
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| ((*a as f64) - (*b as f64)).abs() / scale)
        .fold(0.0, f64::max)
}

struct Case<'a> {
    v: &'a Value,
    name: String,
    sampler: Sampler,
    config: SchedulerConfig,
    steps: usize,
}

fn cases(data: &Value) -> Vec<Case<'_>> {
    data["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| Case {
            v,
            name: v["name"].as_str().unwrap().to_string(),
            sampler: Sampler::from_str(v["sampler"].as_str().unwrap(), false).unwrap(),
            config: SchedulerConfig::from_json(v["config"].as_str().unwrap()).unwrap(),
            steps: v["steps"].as_u64().unwrap() as usize,
        })
        .collect()
}

impl Case<'_> {
    fn build(&self) -> Box<dyn Scheduler> {
        build(Some(self.sampler), &self.config, self.steps)
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    fn rng(&self) -> TorchRng {
        TorchRng::manual_seed(self.v["seed"].as_u64().unwrap())
    }

    fn sample_0(&self, s: &dyn Scheduler, rng: &mut TorchRng) -> Vec<f32> {
        let sigma = s.init_noise_sigma() as f32;
        rng.randn(numel(&self.v["shape"]))
            .iter()
            .map(|x| x * sigma)
            .collect()
    }

    fn steps_taken(&self) -> &Vec<Value> {
        self.v["steps_taken"].as_array().unwrap()
    }
}

/// Runs every fixture case of `sampler` step by step, each step from
/// diffusers' previous sample so that differences do not compound, and
/// checks scale_model_input, step and add_noise. Returns the cases run.
fn check_steps(sampler: Sampler, filter: impl Fn(&str) -> bool) -> usize {
    let data = fixture("schedulers.json");
    let mut count = 0;
    for case in cases(&data)
        .into_iter()
        .filter(|c| c.sampler == sampler && filter(&c.name))
    {
        let mut s = case.build();
        let mut rng = case.rng();
        let mut sample = case.sample_0(s.as_ref(), &mut rng);
        let taken = case.steps_taken();
        assert_eq!(s.timesteps().len(), taken.len(), "{}", case.name);
        for (i, st) in taken.iter().enumerate() {
            let scaled = s.scale_model_input(&sample, i);
            let d = max_rel_diff(&scaled, &floats(&st["scaled"]));
            assert!(
                d <= STEP_TOL,
                "{} step {i}: scale_model_input off by {d:e}",
                case.name
            );
            let prev = s.step(&floats(&st["model_output"]), i, &sample, &mut rng);
            let theirs = floats(&st["prev_sample"]);
            let d = max_rel_diff(&prev, &theirs);
            assert!(
                d <= STEP_TOL,
                "{} step {i}: prev_sample off by {d:e}",
                case.name
            );
            sample = theirs;
        }
        let an = &case.v["add_noise"];
        let out = s.add_noise(
            &floats(&an["original"]),
            &floats(&an["noise"]),
            an["timestep"].as_f64().unwrap(),
        );
        let d = max_rel_diff(&out, &floats(&an["out"]));
        assert!(d <= STEP_TOL, "{}: add_noise off by {d:e}", case.name);
        count += 1;
    }
    assert!(count > 0, "no fixture case for {sampler}");
    count
}

// ------------------------------------------------------------- noise ---

#[test]
fn randn_matches_torch_bit_for_bit_for_every_seed_and_shape() {
    let data = fixture("noise.json");
    for draw in data["vectorized"]["randn"].as_array().unwrap() {
        let seed = draw["seed"].as_u64().unwrap();
        let ours = TorchRng::manual_seed(seed).randn(numel(&draw["shape"]));
        assert_eq!(
            bits(&ours),
            bits(&floats(&draw["values"])),
            "seed {seed} shape {}",
            draw["shape"]
        );
    }
}

#[test]
fn successive_randn_calls_continue_torchs_stream() {
    // Covers the cached second half of a double Box-Muller pair carried
    // from one small draw to the next, across large draws in between.
    let data = fixture("noise.json");
    for seq in data["vectorized"]["sequence"].as_array().unwrap() {
        let mut rng = TorchRng::manual_seed(seq["seed"].as_u64().unwrap());
        for (k, draw) in seq["draws"].as_array().unwrap().iter().enumerate() {
            let ours = rng.randn(numel(&draw["shape"]));
            assert_eq!(bits(&ours), bits(&floats(&draw["values"])), "draw {k}");
        }
    }
}

#[test]
fn rand_matches_torch_and_shares_the_stream_with_randn() {
    let data = fixture("noise.json");
    for r in data["vectorized"]["rand"].as_array().unwrap() {
        let mut rng = TorchRng::manual_seed(r["seed"].as_u64().unwrap());
        assert_eq!(bits(&rng.rand(7)), bits(&floats(&r["rand_7"])));
        assert_eq!(bits(&rng.randn(20)), bits(&floats(&r["then_randn_20"])));
    }
}

/// torch's DEFAULT build calls the C library's logf/cosf/sinf; glibc's are
/// what produced the reference, and other C libraries (MinGW's under wine,
/// macOS's) round differently in the last bit, so only glibc can match.
#[test]
#[cfg_attr(
    not(all(target_os = "linux", target_env = "gnu")),
    ignore = "the scalar kernel follows the C library's logf/cosf/sinf; the reference is glibc's"
)]
fn scalar_kernel_matches_torchs_default_build() {
    let data = fixture("noise.json");
    assert_eq!(data["scalar"]["cpu_capability"], "DEFAULT");
    for draw in data["scalar"]["randn"].as_array().unwrap() {
        let seed = draw["seed"].as_u64().unwrap();
        let ours = TorchRng::manual_seed(seed)
            .with_kernel(NormalKernel::Scalar)
            .randn(numel(&draw["shape"]));
        assert_eq!(bits(&ours), bits(&floats(&draw["values"])), "seed {seed}");
    }
    for seq in data["scalar"]["sequence"].as_array().unwrap() {
        let mut rng =
            TorchRng::manual_seed(seq["seed"].as_u64().unwrap()).with_kernel(NormalKernel::Scalar);
        for draw in seq["draws"].as_array().unwrap() {
            assert_eq!(
                bits(&rng.randn(numel(&draw["shape"]))),
                bits(&floats(&draw["values"]))
            );
        }
    }
}

#[test]
fn seeds_use_only_their_low_32_bits_as_in_torch() {
    let big = TorchRng::manual_seed((1u64 << 32) + 5).randn(40);
    let small = TorchRng::manual_seed(5).randn(40);
    assert_eq!(bits(&big), bits(&small));
    assert_eq!(
        TorchRng::manual_seed((1u64 << 32) + 5).initial_seed(),
        (1u64 << 32) + 5
    );
}

// -------------------------------------------------- schedules, exactly ---

#[test]
fn timesteps_and_init_noise_sigma_equal_diffusers_exactly() {
    let data = fixture("schedulers.json");
    for case in cases(&data) {
        let s = case.build();
        let theirs: Vec<f32> = floats(&case.v["timesteps"]);
        let ours: Vec<f32> = s.timesteps().iter().map(|&t| t as f32).collect();
        assert_eq!(bits(&ours), bits(&theirs), "{}: timesteps", case.name);
        let ins = case.v["init_noise_sigma"].as_f64().unwrap() as f32;
        assert_eq!(
            (s.init_noise_sigma() as f32).to_bits(),
            ins.to_bits(),
            "{}",
            case.name
        );
    }
}

#[test]
fn initial_latent_equals_torch_randn_times_init_noise_sigma() {
    let data = fixture("schedulers.json");
    for case in cases(&data) {
        let s = case.build();
        let ours = case.sample_0(s.as_ref(), &mut case.rng());
        assert_eq!(
            bits(&ours),
            bits(&floats(&case.v["sample_0"])),
            "{}",
            case.name
        );
    }
}

// ------------------------------------------------------ steps, per sampler ---

#[test]
fn ddim_matches_diffusers_on_sd_v_prediction_linear_cosine_zero_snr_and_spacings() {
    assert!(check_steps(Sampler::Ddim, |_| true) >= 10);
}

#[test]
fn pndm_matches_diffusers_sd14_config() {
    // skip_prk_steps true: PLMS, as every Stable Diffusion pipeline runs it.
    assert_eq!(
        check_steps(Sampler::Pndm, |n| n.starts_with("pndm/sd14/")),
        3
    );
}

#[test]
fn pndm_matches_diffusers_with_runge_kutta_steps() {
    // skip_prk_steps false, set in the config or by PNDM's default on a
    // config that lacks the field (`linear`); leading and linspace spacing.
    let n = check_steps(Sampler::Pndm, |n| {
        n.contains("_prk/") || n.starts_with("pndm/linear/")
    });
    assert_eq!(n, 5);
}

#[test]
fn pndm_matches_diffusers_on_other_configs() {
    check_steps(Sampler::Pndm, |n| !n.contains("sd14"));
}

#[test]
fn euler_matches_diffusers() {
    assert!(check_steps(Sampler::Euler, |_| true) >= 10);
}

#[test]
fn euler_ancestral_matches_diffusers_including_its_step_noise() {
    // Includes a 9-element latent (torch's double-precision normals, a
    // cached half carried between steps) and a 256-element one.
    assert!(check_steps(Sampler::EulerAncestral, |_| true) >= 10);
}

#[test]
fn dpmpp_2m_matches_diffusers() {
    assert!(check_steps(Sampler::DpmPp2m, |_| true) >= 10);
}

#[test]
fn dpmpp_2m_karras_matches_diffusers() {
    assert!(check_steps(Sampler::DpmPp2mKarras, |_| true) >= 9);
}

#[test]
fn free_running_trajectories_stay_within_1e_6_of_diffusers() {
    let data = fixture("schedulers.json");
    for case in cases(&data) {
        let mut s = case.build();
        let mut rng = case.rng();
        let mut sample = case.sample_0(s.as_ref(), &mut rng);
        let taken = case.steps_taken();
        for (i, st) in taken.iter().enumerate() {
            let _ = s.scale_model_input(&sample, i);
            sample = s.step(&floats(&st["model_output"]), i, &sample, &mut rng);
        }
        let d = max_rel_diff(&sample, &floats(&taken.last().unwrap()["prev_sample"]));
        assert!(d <= RUN_TOL, "{}: final sample off by {d:e}", case.name);
    }
}

#[test]
fn most_step_outputs_are_bit_identical_to_diffusers() {
    // Only the steps where MKL's sqrt/log/exp round differently may differ.
    let data = fixture("schedulers.json");
    let (mut same, mut total) = (0usize, 0usize);
    for case in cases(&data) {
        let mut s = case.build();
        let mut rng = case.rng();
        let mut sample = case.sample_0(s.as_ref(), &mut rng);
        for (i, st) in case.steps_taken().iter().enumerate() {
            let prev = s.step(&floats(&st["model_output"]), i, &sample, &mut rng);
            let theirs = floats(&st["prev_sample"]);
            same += prev
                .iter()
                .zip(&theirs)
                .filter(|(a, b)| a.to_bits() == b.to_bits())
                .count();
            total += theirs.len();
            sample = theirs;
        }
    }
    let share = same as f64 / total as f64;
    // 98.6 % are (16458 of 16690); most of the rest are the zero-SNR cases,
    // whose rescaled schedule goes through 1000 of torch's square roots.
    assert!(share >= 0.98, "only {same} of {total} values bit-identical");
}

// ---------------------------------------------------- configs and classes ---

const SD14: &str = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0",
  "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
  "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
  "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#;

fn sd14_with(field: &str, value: Value) -> SchedulerConfig {
    let mut v: Value = serde_json::from_str(SD14).unwrap();
    v[field] = value;
    SchedulerConfig::from_json(&v.to_string()).unwrap()
}

#[test]
fn a_config_of_another_class_gets_the_built_classs_defaults() {
    // PNDM and DDIM default to `leading` spacing (901, 801, … with the
    // offset), Euler and DPM-Solver to `linspace` (999, …), as
    // `Class.from_config(pndm_config)` does.
    let config = SchedulerConfig::from_json(SD14).unwrap();
    let first = |s: Sampler| build(Some(s), &config, 10).unwrap().timesteps()[0];
    assert_eq!(first(Sampler::Pndm), 901.0);
    assert_eq!(first(Sampler::Ddim), 901.0);
    assert_eq!(first(Sampler::Euler), 999.0);
    assert_eq!(first(Sampler::EulerAncestral), 999.0);
    assert_eq!(first(Sampler::DpmPp2m), 999.0);
    // PNDM's list repeats its second timestep.
    assert_eq!(
        &build(Some(Sampler::Pndm), &config, 4).unwrap().timesteps()[..3],
        &[751.0, 501.0, 501.0]
    );
}

#[test]
fn none_builds_the_sampler_the_config_names() {
    let of = |class: &str, extra: &str| {
        let c =
            SchedulerConfig::from_json(&format!(r#"{{"_class_name": "{class}"{extra}}}"#)).unwrap();
        Sampler::from_config(&c).unwrap()
    };
    assert_eq!(of("PNDMScheduler", ""), Sampler::Pndm);
    assert_eq!(of("DDIMScheduler", ""), Sampler::Ddim);
    assert_eq!(of("EulerDiscreteScheduler", ""), Sampler::Euler);
    assert_eq!(
        of("EulerAncestralDiscreteScheduler", ""),
        Sampler::EulerAncestral
    );
    assert_eq!(of("DPMSolverMultistepScheduler", ""), Sampler::DpmPp2m);
    assert_eq!(
        of(
            "DPMSolverMultistepScheduler",
            r#", "use_karras_sigmas": true"#
        ),
        Sampler::DpmPp2mKarras
    );
    let config = SchedulerConfig::from_json(SD14).unwrap();
    let a = build(None, &config, 10).unwrap();
    let b = build(Some(Sampler::Pndm), &config, 10).unwrap();
    assert_eq!(a.timesteps(), b.timesteps());
}

#[test]
fn saved_diffusers_configs_are_read_like_diffusers_reads_them() {
    // -Infinity is not JSON but Python writes it; `_use_default_values`
    // fields count as missing (so spacing is DPM's linspace, offset 0).
    let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
        "_use_default_values": ["timestep_spacing", "steps_offset"],
        "timestep_spacing": "trailing", "steps_offset": 7, "note": "Infinity in a string",
        "unknown_field": [1, 2]}"#;
    let config = SchedulerConfig::from_json(text).unwrap();
    assert_eq!(config.lambda_min_clipped, Some(f64::NEG_INFINITY));
    let s = build(None, &config, 10).unwrap();
    assert_eq!(s.timesteps()[0], 999.0);
    // A null flag is false, as Python's truth test makes it.
    let c = sd14_with("skip_prk_steps", Value::Null);
    assert_eq!(build(None, &c, 10).unwrap().timesteps().len(), 19);
}

#[test]
fn scheduler_config_load_reads_a_file_and_names_it_in_errors() {
    let dir = std::env::temp_dir().join(format!("spm-sched-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    std::fs::write(&path, SD14.replace("scaled_linear", "sigmoid")).unwrap();
    let config = SchedulerConfig::load(&path).unwrap();
    let err = build(None, &config, 10).err().unwrap().to_string();
    assert!(
        err.contains("scheduler_config.json") && err.contains("beta_schedule"),
        "{err}"
    );
    std::fs::write(&path, "{not json").unwrap();
    let err = SchedulerConfig::load(&path).unwrap_err().to_string();
    assert!(err.contains("scheduler_config.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ----------------------------------------------------------------- errors ---

fn build_err(sampler: Option<Sampler>, config: &SchedulerConfig, steps: usize) -> String {
    match build(sampler, config, steps) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_beta_schedule_is_a_clear_error() {
    let config = sd14_with("beta_schedule", "sigmoid".into());
    for s in Sampler::ALL {
        let err = build_err(Some(s), &config, 10);
        assert!(
            err.contains("`beta_schedule`")
                && err.contains("\"sigmoid\"")
                && err.contains("scaled_linear"),
            "{err}"
        );
    }
    // trained_betas, when given, win over the schedule, as in diffusers.
    let mut v: Value = serde_json::from_str(SD14).unwrap();
    v["beta_schedule"] = "sigmoid".into();
    v["num_train_timesteps"] = 4.into();
    v["trained_betas"] = serde_json::json!([0.1, 0.2, 0.3, 0.4]);
    assert!(build(
        None,
        &SchedulerConfig::from_json(&v.to_string()).unwrap(),
        2
    )
    .is_ok());
}

#[test]
fn unknown_prediction_type_is_a_clear_error() {
    let config = sd14_with("prediction_type", "flow_prediction".into());
    for s in Sampler::ALL {
        let err = build_err(Some(s), &config, 10);
        assert!(
            err.contains("`prediction_type`") && err.contains("\"flow_prediction\""),
            "{err}"
        );
    }
}

#[test]
fn sample_prediction_is_refused_where_diffusers_refuses_it() {
    // diffusers: NotImplementedError (Euler ancestral), ValueError (PNDM).
    let config = sd14_with("prediction_type", "sample".into());
    for s in [Sampler::EulerAncestral, Sampler::Pndm] {
        assert!(build_err(Some(s), &config, 10).contains("prediction_type"));
    }
    for s in [Sampler::Ddim, Sampler::Euler, Sampler::DpmPp2m] {
        assert!(build(Some(s), &config, 10).is_ok());
    }
}

#[test]
fn unknown_class_name_is_a_clear_error() {
    let config = sd14_with("_class_name", "LMSDiscreteScheduler".into());
    let err = build_err(None, &config, 10);
    assert!(
        err.contains("`_class_name`")
            && err.contains("LMSDiscreteScheduler")
            && err.contains("--sampler"),
        "{err}"
    );
    // An explicit sampler does not need the class.
    assert!(build(Some(Sampler::Euler), &config, 10).is_ok());
    let nameless = SchedulerConfig::from_json("{}").unwrap();
    assert!(build_err(None, &nameless, 10).contains("_class_name"));
}

#[test]
fn zero_steps_is_an_error() {
    let config = SchedulerConfig::from_json(SD14).unwrap();
    for s in Sampler::ALL {
        assert!(build_err(Some(s), &config, 0).contains("at least 1"));
    }
}

#[test]
fn more_steps_than_training_timesteps_is_an_error() {
    let config = SchedulerConfig::from_json(SD14).unwrap();
    for s in Sampler::ALL {
        let err = build_err(Some(s), &config, 1001);
        assert!(
            err.contains("1001") && err.contains("num_train_timesteps") && err.contains("1000"),
            "{err}"
        );
    }
    // 1000 steps of leading spacing plus steps_offset 1 would reach timestep
    // 1000, where diffusers fails with an IndexError.
    let err = build_err(Some(Sampler::Ddim), &config, 1000);
    assert!(
        err.contains("steps_offset") && err.contains("1000"),
        "{err}"
    );
    let offset0 = sd14_with("steps_offset", 0.into());
    assert_eq!(
        build(Some(Sampler::Ddim), &offset0, 1000)
            .unwrap()
            .timesteps()
            .len(),
        1000
    );
}

#[test]
fn unknown_timestep_spacing_is_a_clear_error() {
    let config = sd14_with("timestep_spacing", "karras".into());
    for s in Sampler::ALL {
        let err = build_err(Some(s), &config, 10);
        assert!(
            err.contains("`timestep_spacing`") && err.contains("\"karras\""),
            "{err}"
        );
    }
}

#[test]
fn options_spm_does_not_reproduce_are_refused_not_ignored() {
    let cases = [
        (Sampler::Ddim, "thresholding", Value::Bool(true)),
        (Sampler::Euler, "interpolation_type", "log_linear".into()),
        (Sampler::Euler, "timestep_type", "continuous".into()),
        (Sampler::Euler, "use_exponential_sigmas", Value::Bool(true)),
        (Sampler::DpmPp2m, "final_sigmas_type", "sigma_min".into()),
        (Sampler::DpmPp2m, "lambda_min_clipped", (-5.1).into()),
        (Sampler::DpmPp2m, "variance_type", "learned_range".into()),
    ];
    for (s, field, value) in cases {
        let err = build_err(Some(s), &sd14_with(field, value), 10);
        assert!(err.contains(field), "{err}");
    }
    // Sampling options of a DPM-Solver config that make it another sampler.
    let dpm = |extra: &str| {
        SchedulerConfig::from_json(&format!(
            r#"{{"_class_name": "DPMSolverMultistepScheduler", {extra}}}"#
        ))
        .unwrap()
    };
    assert!(
        build_err(None, &dpm(r#""algorithm_type": "sde-dpmsolver++""#), 10)
            .contains("algorithm_type")
    );
    assert!(build_err(None, &dpm(r#""solver_order": 3"#), 10).contains("solver_order"));
    assert!(build_err(None, &dpm(r#""solver_type": "heun""#), 10).contains("solver_type"));
    // ... unless a sampler is named, which fixes them (diffusers'
    // from_config(config, algorithm_type=..., solver_order=2, ...)).
    assert!(build(Some(Sampler::DpmPp2m), &dpm(r#""solver_order": 3"#), 10).is_ok());
    let euler_karras = SchedulerConfig::from_json(
        r#"{"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": true}"#,
    )
    .unwrap();
    assert!(build_err(None, &euler_karras, 10).contains("use_karras_sigmas"));
    // PNDM's Runge-Kutta start needs 4 timesteps (diffusers fails below).
    let prk = sd14_with("skip_prk_steps", false.into());
    assert!(build_err(Some(Sampler::Pndm), &prk, 3).contains("skip_prk_steps"));
}

#[test]
fn what_diffusers_cannot_run_spm_refuses() {
    let data = fixture("schedulers.json");
    let refused = data["diffusers_refused"].as_array().unwrap();
    assert!(!refused.is_empty());
    for r in refused {
        let sampler = Sampler::from_str(r["sampler"].as_str().unwrap(), false).unwrap();
        let config = SchedulerConfig::from_json(r["config"].as_str().unwrap()).unwrap();
        let steps = r["steps"].as_u64().unwrap() as usize;
        assert!(
            build(Some(sampler), &config, steps).is_err(),
            "{}: {}",
            r["sampler"],
            r["error"]
        );
    }
}

// ------------------------------------------------------------------ names ---

#[test]
fn sampler_names_are_the_cli_names_and_a1111s() {
    let names: Vec<String> = Sampler::ALL
        .iter()
        .map(|s| s.to_possible_value().unwrap().get_name().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "ddim",
            "pndm",
            "euler",
            "euler-a",
            "dpmpp-2m",
            "dpmpp-2m-karras"
        ]
    );
    for s in Sampler::ALL {
        assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        assert_eq!(s.to_string(), s.name());
    }
    let a1111: Vec<_> = Sampler::ALL.iter().map(|s| s.a1111_name()).collect();
    assert_eq!(
        a1111,
        [
            ("DDIM", None),
            ("PLMS", None),
            ("Euler", None),
            ("Euler a", None),
            ("DPM++ 2M", None),
            ("DPM++ 2M", Some("Karras")),
        ]
    );
}
