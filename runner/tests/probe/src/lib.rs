//! Probe for the guest task's lifetime around the end of its response body.
//!
//! Every route answers `200 ok` and prints `probe: <route> <stage>` lines on stderr, so a test
//! can see which stages ran:
//! - `/finish-then-sleep`: finishes the body, then waits 300 ms (a host yield point) and prints
//!   `after-finish`. Spin lets the guest run to its end, so that line appears.
//! - `/sleep-then-finish`: waits 300 ms and prints `before-finish` while the body is still open,
//!   then finishes it (control: the same wait and print do run).
//! - `/finish-then-trap`: finishes the body, then traps without yielding (the error must still be
//!   reported as an error after the response started).

use std::io::Write as _;

use wasi::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

wasi::http::proxy::export!(Probe);

struct Probe;

fn say(line: &str) {
    let mut err = std::io::stderr();
    let _ = writeln!(err, "probe: {line}");
    let _ = err.flush();
}

fn sleep_ms(ms: u64) {
    wasi::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
}

impl wasi::exports::http::incoming_handler::Guest for Probe {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let resp = OutgoingResponse::new(Fields::new());
        let body = resp.body().unwrap();
        ResponseOutparam::set(response_out, Ok(resp));
        let mut out = body.write().unwrap();
        out.write_all(b"ok").unwrap();
        out.flush().unwrap();
        drop(out);
        match path.as_str() {
            "/finish-then-sleep" => {
                OutgoingBody::finish(body, None).unwrap();
                say("finish-then-sleep finished");
                sleep_ms(300);
                say("finish-then-sleep after-finish");
            }
            "/sleep-then-finish" => {
                sleep_ms(300);
                say("sleep-then-finish before-finish");
                OutgoingBody::finish(body, None).unwrap();
            }
            "/finish-then-trap" => {
                OutgoingBody::finish(body, None).unwrap();
                say("finish-then-trap trapping");
                std::process::abort();
            }
            _ => OutgoingBody::finish(body, None).unwrap(),
        }
    }
}
