//! What the benches that time lorascope against a Python reference share: the reference as a
//! child process answering one JSON line per request line (so the two sides can alternate),
//! and the median of the per-pair figures.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, Stdio};

use serde_json::Value;

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The reference side: `script args…`, whose first line of output says it is ready.
pub struct Reference {
    child: Child,
    out: BufReader<ChildStdout>,
    /// The ready line.
    pub hello: Value,
}

impl Reference {
    pub fn start(script: &str, args: &[&std::ffi::OsStr]) -> Self {
        let mut child = Command::new(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{script} runs: {e}"));
        let out = BufReader::new(child.stdout.take().expect("piped"));
        let mut r = Reference { child, out, hello: Value::Null };
        r.hello = r.read();
        r
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("reference answers");
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("the reference failed (see above): {line:?}"))
    }

    /// Send one request line, read one JSON answer.
    pub fn ask(&mut self, cmd: &str) -> Value {
        let stdin = self.child.stdin.as_mut().expect("piped");
        writeln!(stdin, "{cmd}").and_then(|_| stdin.flush()).expect("reference listens");
        self.read()
    }

    pub fn quit(mut self) {
        let _ = writeln!(self.child.stdin.as_mut().expect("piped"), "quit");
        let _ = self.child.wait();
    }
}
