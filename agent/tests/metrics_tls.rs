//! Metrics only Prometheus reads: a real `podscope agent` serves /metrics
//! over TLS (certificates made here with openssl), and Debian's real
//! Prometheus scrapes it with a client certificate and with a bearer token,
//! while a scrape without credentials or with a wrong token is refused;
//! the kubelet's probe path stays open; a replaced certificate is served
//! without a restart. Needs root (the agent loads its probes).

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    certs::{curl, issue, new_ca},
    free_port, get, privileged, required,
};

struct Cleanup(Vec<Child>, PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The serial of the certificate the agent serves right now.
fn served_serial(port: u16) -> String {
    let out = Command::new("sh")
        .args([
            "-c",
            &format!(
                "openssl s_client -connect 127.0.0.1:{port} </dev/null 2>/dev/null | openssl x509 -noout -serial"
            ),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `curl -k` status code for `path`, with extra curl arguments.
fn curl_status(port: u16, path: &str, extra: &[&str]) -> String {
    let mut args = vec!["-k"];
    args.extend_from_slice(extra);
    curl(Path::new("/"), port, path, &args).0
}

#[test]
fn prometheus_scrapes_over_tls_with_a_client_certificate_or_a_token_and_nothing_else() {
    if !privileged("prometheus_scrapes_over_tls") {
        return;
    }
    for tool in ["prometheus", "openssl", "curl"] {
        if !which(tool) {
            assert!(
                !required(),
                "{tool} is needed: `cargo xtask setup` installs it"
            );
            support::say_skipped("prometheus_scrapes_over_tls", &format!("no {tool}"));
            return;
        }
    }
    let dir = std::env::temp_dir().join(format!("podscope-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cleanup = Cleanup(vec![], dir.clone());
    new_ca(&dir, "ca");
    new_ca(&dir, "rogue-ca");
    issue(&dir, "ca", "server", Some("IP:127.0.0.1"), "1001");
    issue(&dir, "ca", "client", None, "2001");
    issue(&dir, "rogue-ca", "rogue", None, "3001");
    std::fs::write(dir.join("token"), "s3cret-token\n").unwrap();

    let port = free_port();
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let agent = Command::new(env!("CARGO_BIN_EXE_podscope"))
        .args([
            "agent",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--no-cri",
            "--state-dir",
            &p("state"),
            "--metrics-tls-cert",
            &p("server.pem"),
            "--metrics-tls-key",
            &p("server.key"),
            "--metrics-client-ca",
            &p("ca.pem"),
            "--metrics-token-file",
            &p("token"),
            "--api-socket",
            &p("api.sock"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    cleanup.0.push(agent);
    // The kubelet's probes need no credentials.
    let deadline = Instant::now() + Duration::from_secs(60);
    while curl_status(port, "/healthz", &[]) != "200" {
        assert!(
            Instant::now() < deadline,
            "the agent answers /healthz over TLS"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Plain HTTP gets nothing.
    assert_ne!(get(port, "/metrics").map(|r| r.0), Some(200));
    // Without credentials, with a wrong token or a certificate of another CA: 401.
    assert_eq!(curl_status(port, "/metrics", &[]), "401");
    assert_eq!(
        curl_status(port, "/metrics", &["-H", "Authorization: Bearer wrong"]),
        "401"
    );
    let rogue = curl_status(
        port,
        "/metrics",
        &["--cert", &p("rogue.pem"), "--key", &p("rogue.key")],
    );
    assert_ne!(rogue, "200", "a certificate of another CA is refused");
    assert_eq!(curl_status(port, "/api/v1/terminations", &[]), "401");
    // Even a scraper's credentials get no node-wide data here: that is on
    // the agent's socket.
    assert_eq!(
        curl_status(
            port,
            "/api/v1/terminations",
            &["-H", "Authorization: Bearer s3cret-token"]
        ),
        "404"
    );

    let prom_port = free_port();
    let target = format!("['127.0.0.1:{port}']");
    let job = |name: &str, extra: &str| {
        format!(
            "  - job_name: {name}\n    scheme: https\n    static_configs:\n      - targets: {target}\n    tls_config:\n      ca_file: {}\n{extra}",
            p("ca.pem")
        )
    };
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n{}{}{}{}",
        job(
            "cert",
            &format!(
                "      cert_file: {}\n      key_file: {}\n",
                p("client.pem"),
                p("client.key")
            )
        ),
        job(
            "token",
            &format!(
                "    authorization:\n      credentials_file: {}\n",
                p("token")
            )
        ),
        job("none", ""),
        job(
            "wrong_token",
            "    authorization:\n      credentials: nope\n"
        ),
    );
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let prom = Command::new("prometheus")
        .arg(format!("--config.file={}", p("prometheus.yml")))
        .arg(format!("--storage.tsdb.path={}", p("tsdb")))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    cleanup.0.push(prom);

    let query = |q: &str| -> Vec<(String, f64)> {
        let Some((200, body)) = get(prom_port, &format!("/api/v1/query?query={q}")) else {
            return vec![];
        };
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        v["data"]["result"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        (
                            r["metric"]["job"].as_str().unwrap_or_default().to_string(),
                            r["value"][1].as_str().unwrap_or("0").parse().unwrap_or(0.0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let want = |up: &[(String, f64)]| {
        let of = |j: &str| up.iter().find(|(n, _)| n == j).map(|x| x.1);
        of("cert") == Some(1.0)
            && of("token") == Some(1.0)
            && of("none") == Some(0.0)
            && of("wrong_token") == Some(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut up = vec![];
    while Instant::now() < deadline {
        up = query("up");
        if want(&up) {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(want(&up), "Prometheus' up by job: {up:?}");
    let scraped: Vec<String> = query("podscope_build_info")
        .into_iter()
        .map(|(j, _)| j)
        .collect();
    assert!(
        scraped.contains(&"cert".to_string()) && scraped.contains(&"token".to_string()),
        "the agent's series came through: {scraped:?}"
    );
    assert!(!scraped.contains(&"none".to_string()));

    // A renewed certificate (same CA) is served without a restart.
    assert!(
        served_serial(port).contains("03E9"),
        "{}",
        served_serial(port)
    );
    issue(&dir, "ca", "server-next", Some("IP:127.0.0.1"), "1002");
    std::fs::rename(dir.join("server-next.key"), dir.join("server.key")).unwrap();
    std::fs::rename(dir.join("server-next.pem"), dir.join("server.pem")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !served_serial(port).contains("03EA") {
        assert!(Instant::now() < deadline, "the new certificate is served");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        curl_status(
            port,
            "/metrics",
            &["-H", "Authorization: Bearer s3cret-token"]
        ),
        "200"
    );
}
