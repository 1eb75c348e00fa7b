//! Safe output: refuse to clobber, never write over, into or around an
//! input, and make every write atomic (built beside its destination, then
//! renamed), so a crash, a full disk or a wrong `-o` never costs a user a
//! model.
//!
//! The rules, for every command:
//!
//! * an output may never *be* an input, *contain* one (a folder output
//!   above an input) or *lie inside* one (a file written into an input
//!   folder). Paths are compared after resolving symlinks, and by file
//!   identity (inode and device, or the Windows file index, through the
//!   `same-file` crate) at every level, so hard links, bind mounts and
//!   case-insensitive spellings are caught too;
//! * an existing output is replaced only with `--force`, and only by an
//!   output of the same kind (a file for a file, a folder for a folder);
//! * `--force` on a folder replaces only what the command itself writes: a
//!   folder that holds anything else is refused, never emptied. The new
//!   folder is built beside the old one and swapped in by rename;
//! * outputs get the permissions of an ordinary file write (`0666`/`0777`
//!   less the umask), not the owner-only mode temp files are created with,
//!   so a WebUI running as another user can read them.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// What a command writes at its output path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    File,
    Folder,
}

/// The rules every command applies before it creates `out` from `inputs`.
pub fn check_output(out: &Path, inputs: &[&Path], kind: OutputKind, force: bool) -> Result<()> {
    let out_abs = resolve(out);
    for input in inputs {
        let Ok(in_abs) = std::fs::canonicalize(input) else {
            // A missing input is reported by the loader, with its own message.
            continue;
        };
        if out_abs == in_abs || same_file::is_same_file(out, input).unwrap_or(false) {
            return Err(Error::usage(format!(
                "refusing to write {}: it is also an input (spm never overwrites its inputs)",
                out.display()
            )));
        }
        if is_within(&in_abs, &out_abs) {
            return Err(Error::usage(format!(
                "refusing to write {}: the input {} lies inside it (an output may never contain an input)",
                out.display(),
                input.display()
            )));
        }
        if is_within(&out_abs, &in_abs) {
            return Err(Error::usage(format!(
                "refusing to write {}: it lies inside the input {} (spm never writes into its inputs)",
                out.display(),
                input.display()
            )));
        }
    }
    let existing = std::fs::symlink_metadata(out).ok();
    if let Some(meta) = existing {
        if !force {
            return Err(Error::usage(format!(
                "{} already exists; pass --force to replace it",
                out.display()
            )));
        }
        // Follow a symlink to see what it names; a dangling one is a file.
        let is_dir = std::fs::metadata(out).map(|m| m.is_dir()).unwrap_or(false);
        match (kind, is_dir || meta.is_dir()) {
            (OutputKind::File, true) => {
                return Err(Error::usage(format!(
                    "{} is a folder; spm writes a single file there and never replaces a folder with one",
                    out.display()
                )))
            }
            (OutputKind::Folder, false) => {
                return Err(Error::usage(format!(
                    "{} is a file; spm writes a folder there and never replaces a file with one",
                    out.display()
                )))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `inner` is strictly below `outer`: by path prefix after
/// resolution, and by file identity of each of `inner`'s ancestors (bind
/// mounts and other aliases of `outer`).
fn is_within(inner: &Path, outer: &Path) -> bool {
    if inner != outer && inner.starts_with(outer) {
        return true;
    }
    if !outer.is_dir() {
        return false;
    }
    let mut cur = inner.parent();
    while let Some(dir) = cur {
        if dir.exists() && same_file::is_same_file(dir, outer).unwrap_or(false) {
            return true;
        }
        cur = dir.parent();
    }
    false
}

/// An absolute path with symlinks resolved as far as the path exists; the
/// missing tail is appended with `.` and `..` folded lexically.
fn resolve(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut head = abs.as_path();
    let mut tail: Vec<Component> = Vec::new();
    loop {
        if let Ok(c) = std::fs::canonicalize(head) {
            let mut out = c;
            for comp in tail.iter().rev() {
                match comp {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    other => out.push(other.as_os_str()),
                }
            }
            return out;
        }
        match (head.parent(), head.components().next_back()) {
            (Some(parent), Some(last)) => {
                tail.push(last);
                head = parent;
            }
            _ => return abs,
        }
    }
}

fn parent_dir(out: &Path) -> PathBuf {
    match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Temp builder whose entries get ordinary permissions: `mode` (`0666` for
/// files, `0777` for folders) less the umask, which open(2)/mkdir(2) apply,
/// like `File::create`. tempfile's file default is `0600`, which a rename
/// would carry into the output.
#[cfg_attr(not(unix), allow(unused_variables))]
fn builder(mode: u32) -> tempfile::Builder<'static, 'static> {
    let mut b = tempfile::Builder::new();
    b.prefix(".spm-tmp-");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(mode));
    }
    b
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
        let tmp = builder(0o666)
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

/// Every file (not folder) below `root`, as paths relative to it.
pub fn relative_files(root: &Path) -> std::io::Result<BTreeSet<PathBuf>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                walk(root, &p, out)?;
            } else {
                out.insert(p.strip_prefix(root).expect("under root").to_path_buf());
            }
        }
        Ok(())
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

/// `--force` on a folder replaces only what spm writes: refuse when the
/// existing folder `dest` holds any file outside `ours` (relative paths).
pub fn check_folder_replace(dest: &Path, ours: &BTreeSet<PathBuf>) -> Result<()> {
    if !dest.is_dir() {
        return Ok(());
    }
    let there = relative_files(dest).map_err(|e| Error::io(dest, e))?;
    let foreign: Vec<String> = there
        .difference(ours)
        .map(|p| p.display().to_string())
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    let shown = foreign
        .iter()
        .take(5)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    Err(Error::usage(format!(
        "refusing to replace {}: it holds {} file(s) spm would not write ({}{}); --force replaces only spm's own output, choose another folder",
        dest.display(),
        foreign.len(),
        shown,
        if foreign.len() > 5 { ", …" } else { "" }
    )))
}

/// A folder built under a temporary name beside its destination and
/// renamed into place at the end; dropped without `commit`, it is removed.
pub struct AtomicDir {
    dest: PathBuf,
    tmp: Option<tempfile::TempDir>,
}

impl AtomicDir {
    pub fn create(dest: &Path) -> Result<Self> {
        let dir = parent_dir(dest);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let tmp = builder(0o777)
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

    /// Swap into place. An existing destination (allowed by `--force`) must
    /// hold nothing but files this folder replaces; it is renamed aside,
    /// the new folder renamed in, and only then is the old one removed.
    pub fn commit(mut self) -> Result<()> {
        let ours = relative_files(self.path()).map_err(|e| Error::io(self.path(), e))?;
        check_folder_replace(&self.dest, &ours)?;
        let tmp = self.tmp.take().expect("live temp dir").keep();
        let dest = &self.dest;
        let mut old = None;
        if std::fs::symlink_metadata(dest).is_ok() {
            // A fresh unique name beside the destination (reserved, then
            // freed so that any kind of entry, folder or symlink, can move there).
            let aside = tempfile::Builder::new()
                .prefix(".spm-old-")
                .tempdir_in(parent_dir(dest))
                .map_err(|e| Error::io(dest, e))?
                .keep();
            std::fs::remove_dir(&aside).map_err(|e| Error::io(&aside, e))?;
            if let Err(e) = std::fs::rename(dest, &aside) {
                let _ = std::fs::remove_dir_all(&tmp);
                let _ = std::fs::remove_dir(&aside);
                return Err(Error::io(dest, e));
            }
            old = Some(aside);
        }
        if let Err(e) = std::fs::rename(&tmp, dest) {
            // Put the old folder back before reporting.
            if let Some(old) = &old {
                let _ = std::fs::rename(old, dest);
            }
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::io(dest, e));
        }
        if let Some(old) = old {
            let _ = std::fs::remove_dir_all(&old);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_folds_missing_tail() {
        let d = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(d.path()).unwrap();
        let p = d.path().join("a/../b/./c");
        assert_eq!(resolve(&p), base.join("b/c"));
    }
}
