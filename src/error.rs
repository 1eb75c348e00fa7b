//! One error type for the library. Every variant names the file, and where
//! it applies the key or field, because a user facing a 2 GB checkpoint needs
//! to know *where* it is broken, not just that it is.

use std::path::{Path, PathBuf};

/// Errors raised by spm's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file itself is unusable (truncated, bad header, unknown format).
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// One tensor or metadata entry is wrong.
    #[error("{}: `{key}`: {msg}", path.display())]
    Key {
        path: PathBuf,
        key: String,
        msg: String,
    },
    /// An operating-system error while reading or writing a path.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The request cannot be honoured as asked (bad flags, lossy output, …).
    #[error("{0}")]
    Usage(String),
    /// The request that asked for the work went away (timeout, disconnect).
    #[error("cancelled: the request ended before the work did")]
    Cancelled,
}

/// Short alias used across the crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn file(path: &Path, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn key(path: &Path, key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Key {
            path: path.to_path_buf(),
            key: key.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        // One wording on every OS (Windows says "The system cannot find the
        // file specified", Linux "No such file or directory").
        if source.kind() == std::io::ErrorKind::NotFound {
            return Error::File {
                path: path.to_path_buf(),
                msg: "No such file or folder".into(),
            };
        }
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }
}
