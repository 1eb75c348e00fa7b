//! A tensor as stored on disk: dtype, shape and raw little-endian bytes.
//!
//! Conversion and renaming never need arithmetic, so tensors stay as bytes
//! (borrowed from a memory map where possible) and are only decoded to `f32`
//! when a command really computes something (merge scales, bake deltas).

use std::ops::Range;
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
pub use safetensors::Dtype;

/// Where a tensor's bytes live.
#[derive(Clone)]
enum Bytes {
    /// A range of a read-only memory map: zero-copy.
    Mapped(Arc<Mmap>, Range<usize>),
    Owned(Arc<Vec<u8>>),
}

/// One tensor: dtype, shape and its bytes.
#[derive(Clone)]
pub struct RawTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    data: Bytes,
}

impl std::fmt::Debug for RawTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}{:?}", self.dtype, self.shape)
    }
}

/// Bytes per element, for the dtypes a LoRA or checkpoint can hold.
pub fn dtype_size(dtype: Dtype) -> Option<usize> {
    let bits = dtype.bitsize();
    (bits.is_multiple_of(8) && bits > 0).then_some(bits / 8)
}

/// The name a dtype has in a safetensors header (`F16`, `BF16`, …).
pub fn dtype_name(dtype: Dtype) -> String {
    format!("{dtype:?}")
}

/// Parse a header dtype name; `None` for names this tool does not know.
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    Some(match name {
        "BOOL" => Dtype::BOOL,
        "U8" => Dtype::U8,
        "I8" => Dtype::I8,
        "I16" => Dtype::I16,
        "U16" => Dtype::U16,
        "F16" => Dtype::F16,
        "BF16" => Dtype::BF16,
        "I32" => Dtype::I32,
        "U32" => Dtype::U32,
        "F32" => Dtype::F32,
        "F64" => Dtype::F64,
        "I64" => Dtype::I64,
        "U64" => Dtype::U64,
        "F8_E5M2" => Dtype::F8_E5M2,
        "F8_E4M3" => Dtype::F8_E4M3,
        _ => return None,
    })
}

pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}

impl RawTensor {
    pub(crate) fn mapped(
        dtype: Dtype,
        shape: Vec<usize>,
        map: Arc<Mmap>,
        range: Range<usize>,
    ) -> Self {
        RawTensor {
            dtype,
            shape,
            data: Bytes::Mapped(map, range),
        }
    }

    pub fn from_bytes(dtype: Dtype, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        RawTensor {
            dtype,
            shape,
            data: Bytes::Owned(Arc::new(bytes)),
        }
    }

    /// Encode `values` in `dtype` (round to nearest for f16/bf16).
    /// Integer dtypes take the value rounded; used only for alpha scalars.
    pub fn from_f32(dtype: Dtype, shape: Vec<usize>, values: &[f32]) -> Self {
        let bytes: Vec<u8> = match dtype {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F64 => values
                .iter()
                .flat_map(|v| (*v as f64).to_le_bytes())
                .collect(),
            Dtype::F16 => values
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::BF16 => values
                .iter()
                .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                .collect(),
            Dtype::I64 => values
                .iter()
                .flat_map(|v| (v.round() as i64).to_le_bytes())
                .collect(),
            Dtype::I32 => values
                .iter()
                .flat_map(|v| (v.round() as i32).to_le_bytes())
                .collect(),
            other => panic!("from_f32: unsupported target dtype {other:?}"),
        };
        Self::from_bytes(dtype, shape, bytes)
    }

    /// A 0-d scalar of `dtype` holding `value` exactly where the dtype can.
    pub fn scalar(dtype: Dtype, value: f64) -> Self {
        let bytes = match dtype {
            Dtype::F64 => value.to_le_bytes().to_vec(),
            Dtype::I64 => (value.round() as i64).to_le_bytes().to_vec(),
            Dtype::I32 => (value.round() as i32).to_le_bytes().to_vec(),
            _ => return Self::from_f32(dtype, vec![], &[value as f32]),
        };
        Self::from_bytes(dtype, vec![], bytes)
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            Bytes::Mapped(map, range) => &map[range.clone()],
            Bytes::Owned(v) => v,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The same bytes under another shape with the same element count
    /// (2-D ↔ 4-D 1×1 conv factors). Never copies.
    pub fn reshaped(&self, shape: Vec<usize>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), self.numel());
        RawTensor {
            dtype: self.dtype,
            shape,
            data: self.data.clone(),
        }
    }

    /// Decode to `f32`. `None` for dtypes that hold no numbers we use.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let b = self.bytes();
        Some(match self.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            Dtype::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                .collect(),
            Dtype::I16 => b
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f32)
                .collect(),
            Dtype::I8 => b.iter().map(|v| *v as i8 as f32).collect(),
            Dtype::U8 => b.iter().map(|v| *v as f32).collect(),
            _ => return None,
        })
    }

    /// The value of a scalar (0-d or 1-element) tensor, e.g. an alpha,
    /// decoded in f64 so that F64 and I64 alphas stay exact.
    pub fn scalar_value(&self) -> Option<f64> {
        if self.numel() != 1 {
            return None;
        }
        let b = self.bytes();
        match self.dtype {
            Dtype::F64 => Some(f64::from_le_bytes(b.try_into().ok()?)),
            Dtype::I64 => Some(i64::from_le_bytes(b.try_into().ok()?) as f64),
            _ => self.to_f32().map(|v| v[0] as f64),
        }
    }

    /// Re-encode in another float dtype; identity when the dtype matches.
    pub fn cast(&self, dtype: Dtype) -> Self {
        if self.dtype == dtype || !is_float(self.dtype) {
            return self.clone();
        }
        if dtype == Dtype::F64 {
            let v = self.to_f32().expect("float tensor");
            let bytes = v.iter().flat_map(|x| (*x as f64).to_le_bytes()).collect();
            return Self::from_bytes(dtype, self.shape.clone(), bytes);
        }
        Self::from_f32(
            dtype,
            self.shape.clone(),
            &self.to_f32().expect("float tensor"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Alphas come as F16, BF16, F32, F64, I64 or I32, 0-d or 1-element
    /// (lora-schemes §1.5). Bytes are built by hand from the IEEE/two's
    /// complement encodings, not by this module.
    #[test]
    fn alpha_scalars_of_every_dtype() {
        let cases: [(Dtype, Vec<usize>, Vec<u8>, f64); 7] = [
            (Dtype::F16, vec![], vec![0x00, 0x40], 2.0), // 0x4000 = 2.0
            (Dtype::BF16, vec![], vec![0x80, 0x3f], 1.0), // 0x3f80 = 1.0
            (Dtype::F32, vec![1], 16f32.to_le_bytes().to_vec(), 16.0),
            (Dtype::F64, vec![], 0.1f64.to_le_bytes().to_vec(), 0.1),
            (Dtype::I64, vec![], 128i64.to_le_bytes().to_vec(), 128.0),
            (Dtype::I32, vec![1], 8i32.to_le_bytes().to_vec(), 8.0),
            (Dtype::F16, vec![1, 1], vec![0x00, 0x38], 0.5), // 0x3800 = 0.5
        ];
        for (dtype, shape, bytes, want) in cases {
            let t = RawTensor::from_bytes(dtype, shape.clone(), bytes);
            assert_eq!(t.scalar_value(), Some(want), "{dtype:?} {shape:?}");
            // Re-encoding the value in its own dtype gives the same bytes.
            if shape.is_empty() {
                assert_eq!(
                    RawTensor::scalar(dtype, want).bytes(),
                    t.bytes(),
                    "{dtype:?}"
                );
            }
        }
        let two = RawTensor::from_bytes(Dtype::F32, vec![2], vec![0; 8]);
        assert_eq!(two.scalar_value(), None);
    }
}
