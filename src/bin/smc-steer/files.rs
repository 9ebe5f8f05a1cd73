//! The files a command reads and writes: inputs read with a bound (so an endless or huge
//! input is refused, not read without end) and outputs written whole or not at all.

use std::path::{Path, PathBuf};

use crate::failure::Failure;

/// Largest prompt file (`--prompt-file`) read, in bytes.
pub const MAX_PROMPT_BYTES: u64 = 16 << 20;
/// Largest grammar or schema file read, in bytes.
pub const MAX_CONSTRAINT_BYTES: u64 = 16 << 20;
/// Largest batch file read, in bytes.
const MAX_BATCH_BYTES: u64 = 1 << 30;
/// Largest batch line (a job: its prompt and options), in bytes.
const MAX_BATCH_LINE_BYTES: u64 = MAX_PROMPT_BYTES + (1 << 20);

/// Read a batch file: at most [`MAX_BATCH_BYTES`] in all and [`MAX_BATCH_LINE_BYTES`] per
/// line, so an endless stream without newlines (`/dev/zero`) is refused after one line's
/// worth of bytes.
pub fn read_batch_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::{BufRead, Read};
    if path.is_dir() {
        return Err("is a directory".into());
    }
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut reader = std::io::BufReader::new(file.take(MAX_BATCH_BYTES + 1));
    let mut bytes = Vec::new();
    let mut line_no = 0usize;
    loop {
        line_no += 1;
        let start = bytes.len();
        let n = (&mut reader)
            .take(MAX_BATCH_LINE_BYTES + 1)
            .read_until(b'\n', &mut bytes)
            .map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        let line_len = bytes.len() - start - usize::from(bytes.last() == Some(&b'\n'));
        if line_len as u64 > MAX_BATCH_LINE_BYTES {
            return Err(format!(
                "line {line_no} is larger than the limit of {MAX_BATCH_LINE_BYTES} bytes"
            ));
        }
        if bytes.len() as u64 > MAX_BATCH_BYTES {
            return Err(format!("larger than the limit of {MAX_BATCH_BYTES} bytes"));
        }
    }
    Ok(bytes)
}

/// Read at most `max` bytes of a file; a longer file (or an endless one such as
/// `/dev/zero`) is an error naming the bound, not an unbounded read.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    if path.is_dir() {
        return Err("is a directory".into());
    }
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > max {
        return Err(format!("larger than the limit of {max} bytes"));
    }
    Ok(bytes)
}

/// A bounded text file as UTF-8 (a leading byte-order mark is dropped).
pub fn read_text(path: &Path, max: u64) -> Result<String, String> {
    let bytes = read_bounded(path, max)?;
    let text = String::from_utf8(bytes)
        .map_err(|e| format!("not valid UTF-8 (at byte {})", e.utf8_error().valid_up_to()))?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(t) => t.to_string(),
        None => text,
    })
}

/// An output file (`--record`, `--report`) written whole or not at all: the contents go to
/// a temporary file next to it, renamed into place once complete.
pub struct OutputFile {
    path: PathBuf,
    tmp: PathBuf,
}

impl OutputFile {
    /// Check, before any model work, that the file can be written (by creating the
    /// temporary file).
    pub fn prepare(path: &Path, flag: &str) -> Result<Self, Failure> {
        let bad = |m: String| Failure::usage(format!("{flag} {}: {m}", path.display()));
        if path.is_dir() {
            return Err(bad("is a directory".into()));
        }
        let name = path
            .file_name()
            .ok_or_else(|| bad("not a file name".into()))?
            .to_string_lossy()
            .into_owned();
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        std::fs::File::create(&tmp).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
        })
    }

    /// Write the contents and move them into place.
    pub fn commit(self, contents: &str) -> Result<(), Failure> {
        let result = std::fs::write(&self.tmp, contents)
            .and_then(|()| std::fs::rename(&self.tmp, &self.path));
        result.map_err(|e| Failure::runtime(format!("cannot write {}: {e}", self.path.display())))
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        // Gone after a rename; otherwise nothing half-written is left behind.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// The absolute path a file has or would have (its folder resolved), to compare two paths.
pub fn canonical(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Some(c);
    }
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.canonicalize().ok()?,
        _ => std::env::current_dir().ok()?,
    };
    Some(parent.join(p.file_name()?))
}
