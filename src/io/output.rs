//! Safe output: refuse to clobber, never write over an input, and make every
//! write atomic (temp file in the destination folder, then rename), so a
//! crash or a full disk never leaves a half-written model where a good one was.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The rules every command applies before it creates `out`.
pub fn check_output(out: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    let out_abs = absolute(out);
    for input in inputs {
        if same_file(&out_abs, &absolute(input)) {
            return Err(Error::usage(format!(
                "refusing to write {}: it is also an input (spm never overwrites its inputs)",
                out.display()
            )));
        }
    }
    if out.exists() && !force {
        return Err(Error::usage(format!(
            "{} already exists; pass --force to replace it",
            out.display()
        )));
    }
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))
}

fn same_file(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    // Hard links or bind mounts: compare inode numbers where both exist.
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
    }
    false
}

fn parent_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A file being written next to its destination; `commit` renames it into
/// place, dropping it without `commit` deletes it.
pub struct AtomicFile {
    dest: PathBuf,
    tmp: tempfile::NamedTempFile,
}

impl AtomicFile {
    pub fn create(dest: &Path) -> Result<Self> {
        let dir = parent_dir(dest);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".spm-tmp-")
            .tempfile_in(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        Ok(AtomicFile {
            dest: dest.to_path_buf(),
            tmp,
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    pub fn buffered(&mut self) -> BufWriter<&mut File> {
        BufWriter::with_capacity(1 << 20, self.tmp.as_file_mut())
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    pub fn commit(self) -> Result<()> {
        let dest = self.dest;
        self.tmp
            .as_file()
            .sync_all()
            .map_err(|e| Error::io(&dest, e))?;
        self.tmp
            .persist(&dest)
            .map_err(|e| Error::io(&dest, e.error))?;
        Ok(())
    }
}

/// A folder built under a temporary name and renamed into place at the end.
pub struct AtomicDir {
    dest: PathBuf,
    tmp: Option<tempfile::TempDir>,
}

impl AtomicDir {
    pub fn create(dest: &Path) -> Result<Self> {
        let dir = parent_dir(dest);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let tmp = tempfile::Builder::new()
            .prefix(".spm-tmp-")
            .tempdir_in(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        Ok(AtomicDir {
            dest: dest.to_path_buf(),
            tmp: Some(tmp),
        })
    }

    pub fn path(&self) -> &Path {
        self.tmp.as_ref().expect("live temp dir").path()
    }

    /// Rename into place. An existing destination (allowed by `--force`) is
    /// moved aside first and removed only after the new folder is in place.
    pub fn commit(mut self) -> Result<()> {
        let tmp = self.tmp.take().expect("live temp dir").keep();
        let dest = &self.dest;
        let mut old = None;
        if dest.exists() {
            let aside = parent_dir(dest).join(format!(
                ".spm-old-{}-{}",
                std::process::id(),
                dest.file_name()
                    .map(|s| s.to_string_lossy())
                    .unwrap_or_default()
            ));
            std::fs::rename(dest, &aside).map_err(|e| Error::io(dest, e))?;
            old = Some(aside);
        }
        std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))?;
        if let Some(old) = old {
            let _ = if old.is_dir() {
                std::fs::remove_dir_all(&old)
            } else {
                std::fs::remove_file(&old)
            };
        }
        Ok(())
    }
}
