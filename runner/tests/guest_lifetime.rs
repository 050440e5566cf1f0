//! The guest task's lifetime around the end of its response body, as in Spin's trigger-http: the
//! guest runs to its end after its body is complete (Spin spawns it and only awaits it), and an
//! error after the response started is still logged.
//!
//! Uses the probe component in `tests/fixtures/abort_probe.wasm` (source: `tests/probe`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Runner {
    child: Child,
    addr: String,
    stderr_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Runner {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let wasm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/abort_probe.wasm");
        let manifest = format!(
            "spin_manifest_version = 2\n[application]\nname = \"probe\"\n\
             [[trigger.http]]\nroute = \"/...\"\ncomponent = \"probe\"\n\
             [component.probe]\nsource = {:?}\n",
            wasm.display().to_string()
        );
        std::fs::write(dir.path().join("spin.toml"), manifest).unwrap();
        let stderr_path = dir.path().join("stderr.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_freerelay"))
            .args(["up", "--listen", "127.0.0.1:0"])
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("runner exited before 'Serving'")
                .unwrap();
            if let Some(url) = line.trim().strip_prefix("Serving http://") {
                break url.to_string();
            }
        };
        // Keep draining stdout so the runner never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Runner {
            child,
            addr,
            stderr_path,
            _dir: dir,
        }
    }

    /// One `GET path` on a fresh connection; returns the whole raw response.
    fn get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    /// Stops the runner as Ctrl-C would and returns everything it wrote to stderr.
    ///
    /// A graceful shutdown waits for every guest task still running (and for the report of
    /// its result), so once the process has exited the log is complete: a guest that was not
    /// aborted would have finished, and printed, by then. No wall-clock guess involved.
    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "cannot signal the runner");
        // Far beyond the runner's own 10 s grace period: only a hung runner gets here.
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the runner did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(&self.stderr_path).unwrap();
        assert!(status.success(), "runner exited with {status}:\n{log}");
        log
    }
}

/// The body of a raw HTTP/1.1 response (de-chunked when chunked).
fn body(resp: &str) -> String {
    let (head, rest) = resp.split_once("\r\n\r\n").expect("no header end");
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return rest.to_string();
    }
    let mut out = String::new();
    let mut rest = rest;
    loop {
        let (size, after) = rest.split_once("\r\n").expect("bad chunk");
        let size = usize::from_str_radix(size.trim(), 16).expect("bad chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn guest_runs_to_its_end_after_the_response_body_is_complete() {
    let runner = Runner::start();

    // Control: the same 300 ms wait and print run while the body is still open.
    let resp = runner.get("/sleep-then-finish");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(body(&resp), "ok", "{resp}");

    // After `finish`, the guest goes on past its next yield (a 300 ms wait) to its end.
    let resp = runner.get("/finish-then-sleep");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(body(&resp), "ok", "{resp}");

    let log = runner.stop();
    assert!(
        log.contains("probe: sleep-then-finish before-finish"),
        "{log}"
    );
    assert!(log.contains("probe: finish-then-sleep finished"), "{log}");
    assert!(
        log.contains("probe: finish-then-sleep after-finish"),
        "guest work after the complete response body must run, as in Spin:\n{log}"
    );
    assert!(!log.contains("failed after its response started"), "{log}");
}

#[test]
fn error_after_a_complete_body_without_a_yield_is_still_logged() {
    let runner = Runner::start();
    let resp = runner.get("/finish-then-trap");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(body(&resp), "ok", "{resp}");
    let log = runner.stop();
    assert!(log.contains("probe: finish-then-trap trapping"), "{log}");
    assert!(
        log.contains("error: component 'probe' failed after its response started"),
        "{log}"
    );
}
