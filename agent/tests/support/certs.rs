//! Certificates made with openssl for the TLS tests.

use std::{path::Path, process::Command};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` making a new P-256 key `name`.key, subject `CN=name`,
/// with `kind` (`-new` for a request, `-x509` for a self-signed CA) and
/// `out` (what it writes).
fn new_key(dir: &Path, kind: &str, name: &str, out: &str, extra: &[&str]) {
    let (key, subj) = (format!("{name}.key"), format!("/CN={name}"));
    let mut args = vec![
        "req",
        kind,
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &key,
        "-out",
        out,
        "-subj",
        &subj,
    ];
    args.extend_from_slice(extra);
    openssl(dir, &args);
}

/// `name`.pem/.key signed by the CA `ca` (`san` for a server, none for a client).
pub fn issue(dir: &Path, ca: &str, name: &str, san: Option<&str>, serial: &str) {
    new_key(dir, "-new", name, &format!("{name}.csr"), &[]);
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        match san {
            Some(s) => format!("subjectAltName={s}\nextendedKeyUsage=serverAuth\n"),
            None => "extendedKeyUsage=clientAuth\n".into(),
        },
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            serial,
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &ext,
        ],
    );
}

/// A self-signed CA: `name`.pem and `name`.key.
pub fn new_ca(dir: &Path, name: &str) {
    new_key(dir, "-x509", name, &format!("{name}.pem"), &["-days", "2"]);
}

/// `curl` over HTTPS to `127.0.0.1:port`, run in `dir` (where relative
/// certificate names are), with extra arguments: (status code, body). The
/// code is `000` when no HTTP answer came (a refused handshake).
pub fn curl(dir: &Path, port: u16, path: &str, extra: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .current_dir(dir)
        .args(["-sS", "-w", "\n%{http_code}", "--max-time", "5"])
        .args(extra)
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}
