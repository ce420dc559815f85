//! `podscope-helper`: the small static program in the test node's image.
//! Each subcommand reproduces one failure shape a podscope test needs, with
//! nothing but the kernel underneath (the image has no libc).
//!
//! ```text
//! podscope-helper alloc MIB [--hold SECS]   touch MIB MiB of memory, then hold it
//! podscope-helper spin THREADS              busy-loop on THREADS threads
//! podscope-helper burst THREADS MS EVERY_MS  every EVERY_MS, MS of CPU on THREADS threads at once
//! podscope-helper sigterm ignore|handle|default|outlive
//!                                           set SIGTERM's disposition, then sleep
//!                                           (outlive: a handler renames the process
//!                                           `got-sigterm` and it sleeps on, for a
//!                                           test to see SIGTERM arrive and be outlived)
//! podscope-helper crash segv                a real invalid memory access
//! podscope-helper pause                     a sandbox's PID 1: reap children, exit on SIGTERM
//! podscope-helper serve PORT                accept TCP connections on PORT, reply `ok`, close
//! podscope-helper connect ADDR:PORT N [--timeout SECS]
//!                                           N TCP connect/close rounds; prints `connected C refused R timeout T`
//! ```

use std::{
    io::Write,
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

const USAGE: &str = "usage: podscope-helper alloc MIB [--hold SECS] | spin THREADS | burst THREADS MS EVERY_MS | sigterm ignore|handle|default|outlive | crash segv | pause | serve PORT | connect ADDR:PORT N [--timeout SECS]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["alloc", mib] => alloc(mib, "3600"),
        ["alloc", mib, "--hold", secs] => alloc(mib, secs),
        ["spin", threads] => spin(threads),
        ["burst", threads, ms, every] => burst(threads, ms, every),
        ["sigterm", mode] => sigterm(mode),
        ["crash", "segv"] => crash_segv(),
        ["pause"] => pause(),
        ["serve", port] => serve(port),
        ["connect", addr, n] => connect(addr, n, "2"),
        ["connect", addr, n, "--timeout", secs] => connect(addr, n, secs),
        _ => Err(format!("unknown arguments {args:?}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "podscope-helper: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn say(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{msg}");
    let _ = out.flush();
}

fn number(s: &str, what: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| format!("{what} must be a whole number, not `{s}`"))
}

fn sleep_forever() -> ! {
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}

/// Touches every page so the memory is really charged to the cgroup (an
/// untouched allocation costs nothing and would never reach the limit).
fn alloc(mib: &str, hold: &str) -> Result<(), String> {
    let mib = number(mib, "MIB")?;
    let hold = number(hold, "SECS")?;
    say(&format!("allocating {mib} MiB"));
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for i in 0..mib {
        let mut chunk = vec![0u8; 1 << 20];
        for page in chunk.iter_mut().step_by(4096) {
            // Volatile so the optimiser cannot drop a write nobody reads.
            unsafe { std::ptr::write_volatile(page, 1) };
        }
        chunks.push(chunk);
        if (i + 1) % 16 == 0 {
            say(&format!("touched {} MiB", i + 1));
        }
    }
    say(&format!("holding {mib} MiB for {hold} s"));
    thread::sleep(Duration::from_secs(hold));
    drop(chunks);
    Ok(())
}

fn spin(threads: &str) -> Result<(), String> {
    let n = number(threads, "THREADS")?;
    say(&format!("spinning on {n} threads"));
    for _ in 0..n {
        thread::spawn(|| {
            let start = Instant::now();
            loop {
                std::hint::black_box(start.elapsed());
            }
        });
    }
    sleep_forever()
}

/// Short bursts on several threads at once, idle in between: an average
/// usage far below the limit that still overruns the quota inside one CFS
/// period (the throttling users see while their dashboards show low CPU).
/// Each burst is MS of CPU time per thread (not of wall time), so that a
/// busy machine stretches a burst instead of shrinking it.
fn burst(threads: &str, ms: &str, every: &str) -> Result<(), String> {
    let n = number(threads, "THREADS")?;
    let busy = Duration::from_millis(number(ms, "MS")?);
    let every = Duration::from_millis(number(every, "EVERY_MS")?);
    if busy >= every {
        return Err(format!(
            "MS ({busy:?}) must be shorter than EVERY_MS ({every:?})"
        ));
    }
    say(&format!(
        "bursting {busy:?} of CPU on {n} threads every {every:?}"
    ));
    let epoch = Instant::now();
    for _ in 0..n {
        thread::spawn(move || {
            let mut next = epoch;
            loop {
                // Every thread starts its burst at the same instant.
                let start = thread_cpu_time();
                while thread_cpu_time().saturating_sub(start) < busy {
                    std::hint::black_box(start);
                }
                next += every;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
    }
    sleep_forever()
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill; the clock exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The name `outlive` takes when SIGTERM arrives (prctl is async-signal-safe:
/// one system call).
extern "C" fn on_sigterm_outlive(_: libc::c_int) {
    unsafe { libc::prctl(libc::PR_SET_NAME, c"got-sigterm".as_ptr()) };
}

extern "C" fn on_sigterm(_: libc::c_int) {
    // Only async-signal-safe calls here: write(2) and _exit(2).
    let msg = b"podscope-helper: got SIGTERM, exiting\n";
    unsafe {
        libc::write(1, msg.as_ptr().cast(), msg.len());
        libc::_exit(0);
    }
}

/// Note that as a container's PID 1, `default` behaves like `ignore`: the
/// kernel does not deliver a default-action signal to a PID namespace's init.
fn sigterm(mode: &str) -> Result<(), String> {
    let handler = match mode {
        "ignore" => libc::SIG_IGN,
        "handle" => on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        "default" => libc::SIG_DFL,
        "outlive" => on_sigterm_outlive as extern "C" fn(libc::c_int) as libc::sighandler_t,
        other => {
            return Err(format!(
                "sigterm takes ignore, handle, default or outlive, not `{other}`"
            ));
        }
    };
    unsafe { libc::signal(libc::SIGTERM, handler) };
    say(&format!("SIGTERM disposition: {mode}; sleeping"));
    sleep_forever()
}

/// Writes to a page mapped without access rights: a genuine fault that the
/// kernel answers with SIGSEGV, not a raise(2) that merely looks like one.
fn crash_segv() -> Result<(), String> {
    say("about to write to an inaccessible page");
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        return Err("mmap failed".into());
    }
    unsafe { std::ptr::write_volatile(page.cast::<u8>(), 1) };
    Err("the write to an inaccessible page did not fault".into())
}

/// A pod sandbox's PID 1 (the role of Kubernetes' `pause`): it reaps the
/// zombies of a shared PID namespace and exits cleanly on SIGTERM or SIGINT.
fn pause() -> Result<(), String> {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGCHLD] {
            libc::sigaddset(&mut set, sig);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        loop {
            let mut sig: libc::c_int = 0;
            if libc::sigwait(&set, &mut sig) != 0 {
                continue;
            }
            if sig == libc::SIGCHLD {
                while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
            } else {
                return Ok(());
            }
        }
    }
}

/// An endpoint behind a Service: every connection gets `ok` and is closed.
fn serve(port: &str) -> Result<(), String> {
    let port = number(port, "PORT")?;
    let listener = std::net::TcpListener::bind(("0.0.0.0", port as u16))
        .map_err(|e| format!("cannot listen on port {port}: {e}"))?;
    say(&format!("listening on {port}"));
    // A failed accept (e.g. the client already gone) is not the server's end.
    for mut c in listener.incoming().flatten() {
        let _ = c.write_all(b"ok\n");
    }
    Ok(())
}

/// A client: N connections, each closed at once; how each ended is counted,
/// so a test sees a REJECT (refused) apart from a DROP (timeout).
fn connect(addr: &str, n: &str, secs: &str) -> Result<(), String> {
    let n = number(n, "N")?;
    let timeout = Duration::from_secs(number(secs, "SECS")?.max(1));
    let addr: std::net::SocketAddr = addr
        .parse()
        .map_err(|_| format!("ADDR:PORT must be an address and a port, not `{addr}`"))?;
    let (mut ok, mut refused, mut timed_out, mut other) = (0u64, 0u64, 0u64, 0u64);
    let mut last_other = String::new();
    for _ in 0..n {
        match std::net::TcpStream::connect_timeout(&addr, timeout) {
            Ok(_) => ok += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => timed_out += 1,
            Err(e) => {
                other += 1;
                last_other = e.to_string();
            }
        }
    }
    say(&format!(
        "connected {ok} refused {refused} timeout {timed_out} other {other}{}",
        if other > 0 {
            format!(" ({last_other})")
        } else {
            String::new()
        }
    ));
    Ok(())
}
