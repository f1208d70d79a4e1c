//! Safe open: every file lorascope reads is opened here (issue #14, findings 4 and 5).
//!
//! - **Only regular files.** The type is checked with `lstat`/`stat` before opening (a device is
//!   never opened), the file is opened with `O_NONBLOCK | O_NOCTTY` (opening a FIFO swapped in
//!   meanwhile returns at once instead of waiting for a writer) and checked again with `fstat`
//!   on the open descriptor, which must be the file that was checked (same device and inode).
//!   Anything else is `Error::Refused` "not a regular file (FIFO)" and is not read.
//! - **No symbolic link out of the tree the user named.** A path the user names on the command
//!   line is theirs: it may be a link and is resolved once (`Tree::named`). Files found or
//!   read under it (a scan's files, a PEFT directory's weights and config, a base directory's
//!   config, index, shards and tokenizer, a works directory's texts) must resolve (all links
//!   followed) to a path inside that tree, else `Error::Refused` "symbolic link leading outside
//!   the … : not followed". A link that resolves to nothing (dangling, or a loop) gets the same
//!   words, so that output never tells whether a path outside the tree exists. The link's
//!   target is never printed: the target path is itself information about the machine running
//!   the scan (user names, layout), and whoever planted the link may read the scan's output.
//!   The final open uses `O_NOFOLLOW` on the resolved path and, on Linux, checks the path of
//!   the opened descriptor (`/proc/self/fd`) against the tree, so a directory swapped for a
//!   link between the check and the open is caught too.
//! - A Hugging Face cache snapshot (`models--org--name/snapshots/<rev>/`, every file a link to
//!   `../../blobs/<hash>`) is one tree with its repository folder.
//!
//! What remains: a device swapped in for a checked regular file between `lstat` and `open`
//! (which needs write access to the tree during the run) is opened, though never read; some
//! devices act on open alone.

use std::fs::{File, Metadata};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Largest JSON file read (configs, indexes, tokenizer.json, report.json: the largest real
/// tokenizer.json files are tens of MB).
pub(crate) const MAX_JSON_BYTES: u64 = 256 << 20;
/// Largest text file read (works, controls, prompts, a scan's `--list`: 1 GiB of text is a
/// large library of books).
pub(crate) const MAX_TEXT_BYTES: u64 = 1 << 30;

/// A directory the user named, resolved once: files found or read under it must resolve inside
/// it. `what` names it in messages ("the scanned tree", "the base model directory").
#[derive(Debug, Clone)]
pub struct Tree {
    root: PathBuf,
    what: &'static str,
}

impl Tree {
    /// The tree of a directory the user named (it may itself be a symbolic link).
    pub(crate) fn named(dir: &Path, what: &'static str) -> Result<Tree> {
        let root = std::fs::canonicalize(dir).map_err(|e| Error::read(dir, "cannot resolve", e))?;
        Ok(Tree { root: hf_cache_repo(root), what })
    }

    /// The tree of files found beside a file the user named (the PEFT config beside the weights
    /// file): the directory the named path lies in.
    pub(crate) fn around(file: &Path, what: &'static str) -> Result<Tree> {
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Self::named(dir, what)
    }

    /// `path` (a file or directory found under the tree) with every link resolved, when that
    /// lies inside the tree; else refused.
    pub(crate) fn resolve(&self, path: &Path) -> Result<PathBuf> {
        match std::fs::canonicalize(path) {
            Ok(c) if c.starts_with(&self.root) => Ok(c),
            Ok(_) => Err(self.outside(path)),
            // A link to nothing, or a loop: the same words as a link out (see the module doc).
            Err(_) if is_link(path) => Err(self.outside(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::input(path, "no such file or directory")),
            Err(e) => Err(Error::read(path, "cannot resolve", e)),
        }
    }

    fn outside(&self, path: &Path) -> Error {
        Error::refused(path, format!("symbolic link leading outside {}: not followed", self.what))
    }
}

/// `…/models--org--name/snapshots/<rev>` of a Hugging Face cache widens to `…/models--org--name`,
/// where its files' links point (`../../blobs/<hash>`).
fn hf_cache_repo(root: PathBuf) -> PathBuf {
    let repo = root.parent().filter(|p| p.file_name().is_some_and(|n| n == "snapshots")).and_then(Path::parent);
    match repo {
        Some(r) if r.join("blobs").is_dir() => r.to_path_buf(),
        _ => root,
    }
}

/// Whether `path` is a symbolic link (not followed).
fn is_link(path: &Path) -> bool {
    path.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink())
}

/// Whether a directory entry of this name exists, whatever its type (links not followed): a
/// PEFT directory's `adapter_model.safetensors` that is a link out or a FIFO is still its
/// weights, to be refused when opened rather than silently passed over.
pub(crate) fn is_entry(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

/// The identity of a file: device and inode (hard links and links to one file share it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct FileId(u64, u64);

impl FileId {
    #[cfg(unix)]
    pub(crate) fn of(m: &Metadata) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        Some(FileId(m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    pub(crate) fn of(_: &Metadata) -> Option<FileId> {
        None
    }
}

/// What a non-regular file is, for messages.
fn kind_name(m: &Metadata) -> &'static str {
    let t = m.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "FIFO";
        }
        if t.is_socket() {
            return "socket";
        }
        if t.is_char_device() {
            return "character device";
        }
        if t.is_block_device() {
            return "block device";
        }
    }
    if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else {
        "not a file"
    }
}

fn regular(path: &Path, m: &Metadata) -> Result<()> {
    if m.is_file() {
        Ok(())
    } else {
        Err(Error::refused(path, format!("not a regular file ({})", kind_name(m))))
    }
}

/// A regular file open for reading, and its size when opened.
pub(crate) struct Opened {
    pub(crate) file: File,
    pub(crate) len: u64,
}

/// Open `path` for reading. `tree`: `None` for a path the user named (links followed), else
/// the tree the path was found under (see the module doc). Errors name `path` as given.
pub(crate) fn open(path: &Path, tree: Option<&Tree>) -> Result<Opened> {
    open_for(path, tree, "cannot open")
}

/// [`open`], saying `failed` ("cannot open", "cannot read") when the system refuses.
fn open_for(path: &Path, tree: Option<&Tree>, failed: &str) -> Result<Opened> {
    let (target, checked) = match tree {
        None => (path.to_path_buf(), std::fs::metadata(path)),
        Some(t) => {
            let c = t.resolve(path)?;
            let m = std::fs::symlink_metadata(&c);
            (c, m)
        }
    };
    let checked = checked.map_err(|e| Error::read(path, failed, e))?;
    regular(path, &checked)?;
    let file = options(tree.is_some()).open(&target).map_err(|e| Error::read(path, failed, e))?;
    let now = file.metadata().map_err(|e| Error::read(path, "cannot stat", e))?;
    regular(path, &now)?;
    if FileId::of(&now) != FileId::of(&checked) {
        return Err(Error::refused(path, "replaced by another file while being opened: not read"));
    }
    if let Some(t) = tree {
        if opened_path(&file).is_some_and(|p| !p.starts_with(&t.root)) {
            return Err(t.outside(path));
        }
    }
    Ok(Opened { len: now.len(), file })
}

#[cfg(unix)]
fn options(in_tree: bool) -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    let nofollow = if in_tree { libc::O_NOFOLLOW } else { 0 };
    o.read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC | nofollow);
    o
}

#[cfg(not(unix))]
fn options(_: bool) -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    o
}

/// The path the kernel holds for an open file (Linux: /proc/self/fd), when it can tell.
#[cfg(target_os = "linux")]
fn opened_path(f: &File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).ok()
}

#[cfg(not(target_os = "linux"))]
fn opened_path(_: &File) -> Option<PathBuf> {
    None
}

/// All bytes of an opened file, at most `limit` (`what` names the kind of file in the error: "an
/// adapter read into memory"). A file that grows past the limit while read is refused too.
pub(crate) fn read_opened(o: &Opened, path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let too_big = |n: u64| Error::input(path, format!("{n} bytes, more than the {limit}-byte limit for {what}"));
    if o.len > limit {
        return Err(too_big(o.len));
    }
    let mut buf = Vec::with_capacity(o.len as usize);
    (&o.file).take(limit + 1).read_to_end(&mut buf).map_err(|e| Error::read(path, "read error", e))?;
    if buf.len() as u64 > limit {
        return Err(too_big(buf.len() as u64));
    }
    Ok(buf)
}

/// Open and read a whole file (see [`open`] and [`read_opened`]).
pub(crate) fn read(path: &Path, tree: Option<&Tree>, limit: u64, what: &str) -> Result<Vec<u8>> {
    read_opened(&open_for(path, tree, "cannot read")?, path, limit, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_cache_snapshots_widen_to_their_repository() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("models--a--b");
        std::fs::create_dir_all(repo.join("snapshots/rev")).unwrap();
        let root = std::fs::canonicalize(repo.join("snapshots/rev")).unwrap();
        assert_eq!(hf_cache_repo(root.clone()), root, "no blobs/: not a cache");
        std::fs::create_dir(repo.join("blobs")).unwrap();
        assert_eq!(hf_cache_repo(root), std::fs::canonicalize(&repo).unwrap());
    }

    #[test]
    fn reads_stop_at_the_limit() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, [7u8; 100]).unwrap();
        assert_eq!(read(&p, None, 100, "a test file").unwrap().len(), 100);
        let e = read(&p, None, 99, "a test file").unwrap_err().to_string();
        assert!(e.contains("100 bytes, more than the 99-byte limit for a test file"), "{e}");
    }
}
