//! `hostile`: a compute component that misbehaves on request, for the sandbox tests.
//! `parameters.mode` picks the misbehaviour: `loop` (spin forever), `sleep-loop` (spin on the
//! host clock), `alloc` (grow memory without end), `recurse` (unbounded recursion), `panic`,
//! `huge` (a result far over the limit), `garbage` (a result that is not JSON), `spam`
//! (call the host without end), `clock` (read the WASI clock); anything else answers
//! `{"ok": true}`.
//!
//! Waits inside WASI, each of which the host must end at the call's deadline or answer at
//! once: `sleep` (`std::thread::sleep` for ten minutes), `poll` (`wasi:io/poll.poll` on a
//! ten-minute monotonic-clock subscription), `block` (`pollable.block` on a clock instant far
//! ahead), `ready-loop` (spin on `pollable.ready`), `stdin` (a blocking read of stdin),
//! `stdout` (blocking writes to stdout and stderr), `stream-poll` (poll stdin's and stdout's
//! pollables), `tcp` (connect to a TCP address and wait for it), `udp` (bind a UDP socket),
//! `dns` (resolve a name and wait for the answer), `fs` (list preopened directories),
//! `env` (read the environment and arguments). The ones that return report what WASI said.

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
            other => match wasi_wait(other) {
                Some(report) => Ok(format!("{{\"wasi\": {report:?}}}")),
                None => Ok("{\"ok\": true}".into()),
            },
        }
    }
}

export!(Hostile);

/// The WASI waits of the module doc; `None` for a mode that is not one of them.
fn wasi_wait(mode: &str) -> Option<String> {
    use wasi::clocks::monotonic_clock;
    use wasi::sockets::{instance_network, ip_name_lookup, network, tcp_create_socket};
    const TEN_MINUTES_NS: u64 = 600_000_000_000;
    Some(match mode {
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_secs(600));
            "slept".into()
        }
        "poll" => {
            let p = monotonic_clock::subscribe_duration(TEN_MINUTES_NS);
            format!("poll: {:?}", wasi::io::poll::poll(&[&p]))
        }
        "block" => {
            let p = monotonic_clock::subscribe_instant(monotonic_clock::now() + TEN_MINUTES_NS);
            p.block();
            "blocked".into()
        }
        "ready-loop" => {
            let p = monotonic_clock::subscribe_duration(TEN_MINUTES_NS);
            while !p.ready() {}
            "ready".into()
        }
        "stdin" => {
            let stdin = wasi::cli::stdin::get_stdin();
            format!("stdin: {:?}", stdin.blocking_read(1024).map(|b| b.len()))
        }
        "stdout" => {
            let out = wasi::cli::stdout::get_stdout();
            let err = wasi::cli::stderr::get_stderr();
            let mut r = Vec::new();
            for _ in 0..1000 {
                r.push(out.blocking_write_and_flush(&[b'x'; 4096]).is_ok());
                r.push(err.blocking_write_and_flush(&[b'y'; 4096]).is_ok());
            }
            format!("stdout: {} of {} writes ok", r.iter().filter(|ok| **ok).count(), r.len())
        }
        "stream-poll" => {
            let stdin = wasi::cli::stdin::get_stdin();
            let out = wasi::cli::stdout::get_stdout();
            let (a, b) = (stdin.subscribe(), out.subscribe());
            format!("stream-poll: {:?}", wasi::io::poll::poll(&[&a, &b]))
        }
        "tcp" => {
            let net = instance_network::instance_network();
            let sock = match tcp_create_socket::create_tcp_socket(network::IpAddressFamily::Ipv4) {
                Ok(s) => s,
                Err(e) => return Some(format!("tcp create: {}", e.name())),
            };
            let addr = network::IpSocketAddress::Ipv4(network::Ipv4SocketAddress {
                port: 80,
                address: (10, 255, 255, 1),
            });
            if let Err(e) = sock.start_connect(&net, addr) {
                return Some(format!("tcp connect: {}", e.name()));
            }
            sock.subscribe().block();
            format!("tcp finish: {:?}", sock.finish_connect().map(drop))
        }
        "udp" => {
            let net = instance_network::instance_network();
            let sock = match wasi::sockets::udp_create_socket::create_udp_socket(
                network::IpAddressFamily::Ipv4,
            ) {
                Ok(s) => s,
                Err(e) => return Some(format!("udp create: {}", e.name())),
            };
            let addr = network::IpSocketAddress::Ipv4(network::Ipv4SocketAddress {
                port: 0,
                address: (0, 0, 0, 0),
            });
            if let Err(e) = sock.start_bind(&net, addr) {
                return Some(format!("udp bind: {}", e.name()));
            }
            sock.subscribe().block();
            format!("udp finish: {:?}", sock.finish_bind())
        }
        "dns" => {
            let net = instance_network::instance_network();
            match ip_name_lookup::resolve_addresses(&net, "example.com") {
                Err(e) => format!("dns: {}", e.name()),
                Ok(stream) => {
                    stream.subscribe().block();
                    format!("dns: {:?}", stream.resolve_next_address().map(|a| a.is_some()))
                }
            }
        }
        "fs" => format!(
            "fs: {} preopened directories",
            wasi::filesystem::preopens::get_directories().len()
        ),
        "env" => format!(
            "env: {} variables, {} arguments",
            wasi::cli::environment::get_environment().len(),
            wasi::cli::environment::get_arguments().len()
        ),
        _ => return None,
    })
}
