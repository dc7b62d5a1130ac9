//! Child processes with captured output, and the workspace's binaries.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::wait_until;

/// Path of a workspace binary (`pgferry-source`, …) next to the running test or binary.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    // Test executables live in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} does not exist: build with `cargo build --release --bins` first",
        p.display()
    );
    p
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().to_string();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion; its stdout on success, an error with both streams otherwise.
pub fn command_output(cmd: &mut Command) -> Result<String> {
    let what = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "{what} failed with {}\nstdout:\n{stdout}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// A child process whose stdout and stderr are captured (and echoed to the test's stderr with
/// a name prefix, so a failing test shows the agents' logs). Killed on drop.
pub struct ChildGuard {
    name: String,
    child: Child,
    output: Arc<Mutex<String>>,
    /// Standard output alone: the two streams are read by separate threads, so in `output` a
    /// line of one may land between two lines of the other.
    stdout: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl ChildGuard {
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        Self::spawn_opts(name, &mut cmd, true)
    }

    /// Like [`spawn`](Self::spawn) without echoing the output.
    pub fn spawn_quiet(name: &str, mut cmd: Command) -> Result<Self> {
        Self::spawn_opts(name, &mut cmd, false)
    }

    fn spawn_opts(name: &str, cmd: &mut Command, echo: bool) -> Result<Self> {
        let what = describe(cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let output = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        // Each stream, and the buffer it also goes to alone (stdout's).
        type Stream = (Box<dyn Read + Send>, Option<Arc<Mutex<String>>>);
        let streams: Vec<Stream> = vec![
            (
                Box::new(child.stdout.take().expect("piped")),
                Some(stdout.clone()),
            ),
            (Box::new(child.stderr.take().expect("piped")), None),
        ];
        for (stream, alone) in streams {
            let out = output.clone();
            let name = name.to_string();
            readers.push(std::thread::spawn(move || {
                let mut r = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            if echo {
                                eprint!("[{name}] {line}");
                            }
                            out.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push_str(&line);
                            if let Some(alone) = &alone {
                                alone
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .push_str(&line);
                            }
                        }
                    }
                }
            }));
        }
        Ok(Self {
            name: name.to_string(),
            child,
            output,
            stdout,
            readers,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What the process printed on standard output alone, so far.
    pub fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits for a line containing `needle`; returns that line.
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> Result<String> {
        let r = wait_until(
            &format!("{} to print {needle:?}", self.name),
            timeout,
            || {
                self.output()
                    .lines()
                    .find(|l| l.contains(needle))
                    .map(str::to_string)
            },
        );
        if r.is_err() {
            eprintln!("--- {} output so far ---\n{}", self.name, self.output());
        }
        r
    }

    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGTERM, then waits up to `timeout` (SIGKILL after that, and an error).
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.child.try_wait()? {
            return Ok(s);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let waited = wait_until(
            &format!("{} to exit after SIGTERM", self.name),
            timeout,
            || self.child.try_wait().ok().flatten(),
        );
        match waited {
            Ok(s) => {
                self.join_readers();
                Ok(s)
            }
            Err(e) => {
                self.kill();
                Err(e)
            }
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let s = wait_until(&format!("{} to exit", self.name), timeout, || {
            self.child.try_wait().ok().flatten()
        })?;
        self.join_readers();
        Ok(s)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.join_readers();
    }

    fn join_readers(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
