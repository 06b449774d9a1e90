//! `hostile`: a compute component that misbehaves on request, for the sandbox tests.
//! `parameters.mode` picks the misbehaviour: `loop` (spin forever), `sleep-loop` (spin on the
//! host clock), `alloc` (grow memory without end), `recurse` (unbounded recursion), `panic`,
//! `huge` (a result far over the limit), `garbage` (a result that is not JSON), `spam`
//! (call the host without end), `clock` (read the WASI clock); anything else answers
//! `{"ok": true}`.

wit_bindgen::generate!({
    path: "../../wit",
    world: "compute",
});

use twinhost::platform::host::{get_twin, now_ms};

struct Hostile;

fn mode(parameters: &str) -> &str {
    // No JSON library, to keep this guest tiny: find "mode":"<word>".
    parameters
        .split("\"mode\"")
        .nth(1)
        .and_then(|rest| rest.split('"').nth(1))
        .unwrap_or("")
}

#[inline(never)]
#[allow(unconditional_recursion)] // the point of this mode
fn recurse(n: u64, acc: &mut Vec<u64>) -> u64 {
    acc.push(n);
    recurse(n + 1, acc) + acc.len() as u64
}

impl Guest for Hostile {
    fn run(twins: Vec<Twin>, parameters: String) -> Result<String, String> {
        match mode(&parameters) {
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "sleep-loop" => loop {
                std::hint::black_box(now_ms());
            },
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                }
            }
            "recurse" => {
                let mut acc = Vec::new();
                Ok(recurse(0, &mut acc).to_string())
            }
            "panic" => panic!("this guest panics on purpose"),
            // Over the host's 4 MiB result limit, well within the memory limit.
            "huge" => Ok(format!("\"{}\"", "x".repeat(5 << 20))),
            "garbage" => Ok("this is not json {".into()),
            // What the WASI clock says (the host freezes it at the epoch).
            "clock" => Ok(std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(u128::MAX)
                .to_string()),
            "spam" => {
                let id = twins.first().map(|t| t.id.clone()).unwrap_or_default();
                loop {
                    std::hint::black_box(get_twin(&id));
                }
            }
            _ => Ok("{\"ok\": true}".into()),
        }
    }
}

export!(Hostile);
