//! The notebook the service keeps for each session: every execution appended as a code cell with its
//! outputs and execution count, as nbformat 4.5 JSON.
//!
//! It is written by the service from its own record of the executions, never read back from the
//! sandbox, in the notebooks folder that only the service writes (it is never mounted into a session).
//! Appending costs the cell, not the notebook: the file always ends with a fixed trailer, and a new cell
//! is written over it, followed by the trailer again. What a kernel sent is attacker input: MIME data is
//! coerced to nbformat's types, so the notebook stays valid whatever the kernel sent.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::kernel::Output;

use super::model::ExecuteResult;

/// Beyond this size a notebook keeps the code of new cells but not their outputs.
pub const MAX_NOTEBOOK_BYTES: u64 = 64 << 20;

/// One session's notebook file.
pub struct Notebook {
    path: PathBuf,
    file: File,
    trailer: Vec<u8>,
    /// Cells already in the file.
    cells: u64,
    size: u64,
}

/// What the notebook says about its kernel.
#[derive(Debug, Clone)]
pub struct KernelSpec {
    pub name: String,
    pub display_name: String,
    pub language: String,
}

impl Notebook {
    /// Opens the notebook at `path`, creating it (and its folder) if need be; an existing one (a session
    /// adopted after a restart, or a user's notebook that outlives its sessions) is appended to. The file
    /// is opened without following links; a file that is not one of ours is set aside, not overwritten.
    pub fn open(path: &Path, spec: &KernelSpec) -> std::io::Result<Notebook> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let trailer = trailer(spec);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::other(format!("{} is not a regular file", path.display())));
        }
        let size = meta.len();
        let mut notebook = Notebook { path: path.to_path_buf(), file, trailer, cells: 0, size };
        if size == 0 || !notebook.ends_with_trailer()? {
            if size > 0 {
                // Not a notebook we can append to (another version, a hand edit): keep it aside.
                let aside = path.with_extension(format!("ipynb.{}", chrono::Utc::now().format("%Y%m%dT%H%M%S")));
                std::fs::rename(path, &aside)?;
                return Notebook::open(path, spec);
            }
            notebook.write_empty()?;
        } else {
            notebook.cells = notebook.count_hint()?;
        }
        Ok(notebook)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn ends_with_trailer(&mut self) -> std::io::Result<bool> {
        let n = self.trailer.len() as u64;
        if self.size < n + HEAD.len() as u64 {
            return Ok(false);
        }
        let mut tail = vec![0u8; n as usize];
        self.file.seek(SeekFrom::Start(self.size - n))?;
        self.file.read_exact(&mut tail)?;
        let mut head = vec![0u8; HEAD.len()];
        self.file.seek(SeekFrom::Start(0))?;
        self.file.read_exact(&mut head)?;
        Ok(tail == self.trailer && head == HEAD.as_bytes())
    }

    /// Whether the notebook has cells: the byte before the trailer is the `[` of an empty list or not.
    fn count_hint(&mut self) -> std::io::Result<u64> {
        let at = self.size - self.trailer.len() as u64 - 1;
        let mut byte = [0u8; 1];
        self.file.seek(SeekFrom::Start(at))?;
        self.file.read_exact(&mut byte)?;
        Ok(if byte[0] == b'[' { 0 } else { 1 })
    }

    fn write_empty(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(HEAD.as_bytes())?;
        self.file.write_all(&self.trailer)?;
        self.size = (HEAD.len() + self.trailer.len()) as u64;
        self.cells = 0;
        Ok(())
    }

    /// Appends one execution as a code cell.
    pub fn append(&mut self, code: &str, result: &ExecuteResult) -> std::io::Result<()> {
        let keep_outputs = self.size < MAX_NOTEBOOK_BYTES;
        let cell = cell(code, result, keep_outputs);
        let mut bytes = Vec::with_capacity(cell.len() + self.trailer.len() + 4);
        if self.cells > 0 {
            bytes.extend_from_slice(b",");
        }
        bytes.extend_from_slice(b"\n  ");
        bytes.extend_from_slice(cell.as_bytes());
        bytes.extend_from_slice(&self.trailer);
        let at = self.size - self.trailer.len() as u64;
        self.file.seek(SeekFrom::Start(at))?;
        self.file.write_all(&bytes)?;
        self.size = at + bytes.len() as u64;
        self.cells += 1;
        Ok(())
    }
}

const HEAD: &str = "{\n \"cells\": [";

fn trailer(spec: &KernelSpec) -> Vec<u8> {
    let metadata = json!({
        "kernelspec": {"name": spec.name, "display_name": spec.display_name, "language": spec.language},
        "language_info": {"name": spec.language},
    });
    format!("\n ],\n \"metadata\": {metadata},\n \"nbformat\": 4,\n \"nbformat_minor\": 5\n}}\n").into_bytes()
}

/// One code cell, as one line of JSON.
fn cell(code: &str, result: &ExecuteResult, keep_outputs: bool) -> String {
    let outputs: Vec<Value> = if keep_outputs {
        result.outputs.iter().map(|o| output(o, result.execution_count)).collect()
    } else {
        vec![
            json!({"output_type": "stream", "name": "stderr", "text": "(outputs not kept: the notebook is over its size limit)\n"}),
        ]
    };
    json!({
        "cell_type": "code",
        "execution_count": result.execution_count,
        "id": uuid::Uuid::new_v4().simple().to_string(),
        "metadata": {"kernelbox": {"status": result.status.as_str(), "duration_ms": result.duration_ms}},
        "outputs": outputs,
        "source": code,
    })
    .to_string()
}

fn output(o: &Output, count: Option<u64>) -> Value {
    match o {
        Output::Stream { name, text } => {
            let name = if name == "stderr" { "stderr" } else { "stdout" };
            json!({"output_type": "stream", "name": name, "text": text})
        }
        Output::DisplayData { data, metadata } => {
            json!({"output_type": "display_data", "data": mime_bundle(data), "metadata": object(metadata)})
        }
        Output::ExecuteResult { execution_count, data, metadata } => json!({
            "output_type": "execute_result",
            "execution_count": execution_count.or(count),
            "data": mime_bundle(data),
            "metadata": object(metadata),
        }),
        Output::Error { ename, evalue, traceback } => {
            json!({"output_type": "error", "ename": ename, "evalue": evalue, "traceback": traceback})
        }
    }
}

/// nbformat's mimebundle: JSON types keep any JSON; every other type is a string (or a list of them).
fn mime_bundle(data: &Map<String, Value>) -> Value {
    let bundle: Map<String, Value> = data
        .iter()
        .filter(|(mime, _)| mime.contains('/'))
        .map(|(mime, v)| {
            let json_type = mime.ends_with("json");
            let v = match v {
                _ if json_type => v.clone(),
                Value::String(_) => v.clone(),
                Value::Array(items) if items.iter().all(Value::is_string) => v.clone(),
                other => Value::String(other.to_string()),
            };
            (mime.clone(), v)
        })
        .collect();
    Value::Object(bundle)
}

fn object(metadata: &Map<String, Value>) -> Value {
    Value::Object(metadata.clone())
}

/// The session's notebook, and whether it outlives the session.
pub struct NotebookHandle {
    pub notebook: Notebook,
    pub keep: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::model::ExecStatus;

    fn spec() -> KernelSpec {
        KernelSpec { name: "python".into(), display_name: "Python 3".into(), language: "python".into() }
    }

    fn result(count: u64, outputs: Vec<Output>) -> ExecuteResult {
        ExecuteResult {
            status: ExecStatus::Ok,
            execution_count: Some(count),
            outputs,
            stdout: String::new(),
            stderr: String::new(),
            streams_abridged: false,
            error: None,
            duration_ms: 3,
            truncated: false,
            killed_reason: None,
            kernel_restarted: false,
            stream_events_dropped: 0,
            network: None,
        }
    }

    fn read(path: &Path) -> Value {
        serde_json::from_slice(&std::fs::read(path).unwrap()).expect("the notebook is valid JSON")
    }

    #[test]
    fn executions_are_appended_as_code_cells_and_the_file_stays_valid_json_after_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u/notebook_u.ipynb");
        let mut nb = Notebook::open(&path, &spec()).unwrap();
        assert_eq!(read(&path)["cells"], json!([]));
        assert_eq!(read(&path)["nbformat"], 4);
        nb.append("print(1)", &result(1, vec![Output::Stream { name: "stdout".into(), text: "1\n".into() }])).unwrap();
        let v = read(&path);
        assert_eq!(v["cells"][0]["source"], "print(1)");
        assert_eq!(v["cells"][0]["execution_count"], 1);
        assert_eq!(v["cells"][0]["outputs"][0], json!({"output_type": "stream", "name": "stdout", "text": "1\n"}));
        let mut data = Map::new();
        data.insert("text/plain".into(), json!(42));
        data.insert("application/json".into(), json!({"a": 1}));
        data.insert("nonsense".into(), json!("dropped"));
        nb.append("x", &result(2, vec![Output::ExecuteResult { execution_count: None, data, metadata: Map::new() }]))
            .unwrap();
        let v = read(&path);
        assert_eq!(v["cells"].as_array().unwrap().len(), 2);
        let out = &v["cells"][1]["outputs"][0];
        assert_eq!(out["data"], json!({"text/plain": "42", "application/json": {"a": 1}}), "coerced to nbformat");
        assert_eq!(out["execution_count"], 2);
        assert_eq!(v["metadata"]["kernelspec"]["name"], "python");
    }

    #[test]
    fn a_reopened_notebook_is_appended_to_and_a_foreign_file_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.ipynb");
        Notebook::open(&path, &spec()).unwrap().append("a = 1", &result(1, vec![])).unwrap();
        Notebook::open(&path, &spec()).unwrap().append("a += 1", &result(2, vec![])).unwrap();
        let sources: Vec<Value> =
            read(&path)["cells"].as_array().unwrap().iter().map(|c| c["source"].clone()).collect();
        assert_eq!(sources, vec![json!("a = 1"), json!("a += 1")]);

        std::fs::write(&path, "{\"something\": \"else\"}").unwrap();
        let mut nb = Notebook::open(&path, &spec()).unwrap();
        nb.append("b = 2", &result(1, vec![])).unwrap();
        assert_eq!(read(&path)["cells"].as_array().unwrap().len(), 1);
        let aside = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(aside, 2, "the foreign file is kept beside the new notebook");
    }

    #[test]
    fn a_symlink_in_place_of_the_notebook_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        std::fs::write(&target, "precious").unwrap();
        let path = dir.path().join("n.ipynb");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(Notebook::open(&path, &spec()).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
    }
}
