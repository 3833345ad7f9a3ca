//! Headless Chromium through chromedriver (Debian's), for tests that drive the page.

use std::time::{Duration, Instant};

/// Runs `f` against a fresh headless Chromium, then ends the browser and
/// the chromedriver this started (by its handle).
pub async fn with_chromium<T, F, Fut>(f: F) -> Result<T, String>
where
    F: FnOnce(fantoccini::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut driver = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromedriver (Debian package chromium-driver) must be installed");
    let profile = tempfile::tempdir().unwrap();
    let result = async {
        let client = chromium_session(port, profile.path()).await?;
        let r = f(client.clone()).await;
        let _ = client.close().await;
        r
    }
    .await;
    let _ = driver.kill();
    let _ = driver.wait();
    result
}

pub async fn chromium_session(port: u16, profile: &std::path::Path) -> Result<fantoccini::Client, String> {
    let caps: serde_json::Map<String, serde_json::Value> = serde_json::from_value(serde_json::json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--disable-quic", "--window-size=1280,760",
                     format!("--user-data-dir={}", profile.display())]
        }
    }))
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match fantoccini::ClientBuilder::native()
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(format!("chromedriver: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Polls `expr` in the page until `done` holds for its value (or 40 s pass).
pub async fn poll_page(
    client: &fantoccini::Client,
    expr: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value, String> {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let v = client.execute(&format!("return {expr}"), vec![]).await.map_err(|e| e.to_string())?;
        if done(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            let text = client.execute("return document.body.innerText", vec![]).await.ok();
            return Err(format!("the page did not get there: {v} / {text:?}"));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
