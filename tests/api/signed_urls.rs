//! Signed file links with API keys configured: the URLs `/jupyter/execute` (written files, displayed images),
//! `/jupyter/files` uploads and `/v1` executions with `"images": "files"` return open in a plain HTTP client
//! without the key (as a browser or an `<img>` tag would), and only for that one file: an altered path,
//! expiry or signature, another owner's file, another method or an expired link is refused (403), while
//! the key still opens the file as before.

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::compat_session::{assert_detail, post_json_with};
use crate::helpers::*;

const ALPHA: &str = "alpha-signed-links";
const BETA: &str = "beta-signed-links";
const PLOT: &str = "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.show()";
const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

/// A client as a browser is to us: no key, no cookies, and redirects not followed.
fn browser() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// GETs `url` (with `key` as a bearer token, if any): the status and the body.
async fn open(url: &str, key: Option<&str>) -> (u16, Vec<u8>) {
    let mut request = browser().get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let r = request.send().await.expect("request");
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// A `/jupyter` link: `<base>/jupyter/files/signed/<expires>/<signature>/<name>`.
struct JupyterLink {
    base: String,
    expires: i64,
    signature: String,
    name: String,
}

impl JupyterLink {
    fn parse(url: &str) -> Self {
        let (base, rest) =
            url.split_once("/jupyter/files/signed/").unwrap_or_else(|| panic!("not a signed link: {url}"));
        let parts: Vec<&str> = rest.split('/').collect();
        assert_eq!(parts.len(), 3, "{url}");
        JupyterLink {
            base: base.to_owned(),
            expires: parts[0].parse().unwrap(),
            signature: parts[1].to_owned(),
            name: parts[2].to_owned(),
        }
    }

    fn url(&self) -> String {
        format!("{}/jupyter/files/signed/{}/{}/{}", self.base, self.expires, self.signature, self.name)
    }

    fn plain(&self) -> String {
        format!("{}/jupyter/files/{}", self.base, self.name)
    }
}

/// A `/v1` link: `<path>?expires=<expires>&signature=<signature>`.
struct V1Link {
    path: String,
    expires: i64,
    signature: String,
}

impl V1Link {
    fn parse(url: &str) -> Self {
        let (path, query) = url.split_once('?').unwrap_or_else(|| panic!("not a signed link: {url}"));
        let (expires, signature) = query
            .strip_prefix("expires=")
            .and_then(|q| q.split_once("&signature="))
            .unwrap_or_else(|| panic!("not a signed link: {url}"));
        V1Link { path: path.to_owned(), expires: expires.parse().unwrap(), signature: signature.to_owned() }
    }

    fn url(&self, app: &TestApp) -> String {
        app.url(&format!("{}?expires={}&signature={}", self.path, self.expires, self.signature))
    }
}

/// A signature with its last character changed.
fn flipped(signature: &str) -> String {
    let mut s = signature.to_owned();
    let last = s.pop().unwrap();
    s.push(if last == 'A' { 'B' } else { 'A' });
    s
}

fn assert_forbidden_v1(status: u16, body: &[u8], code: &str, what: &str) {
    assert_eq!(status, 403, "{what}: {}", String::from_utf8_lossy(body));
    let v = json_of(body);
    assert_eq!(v["error"]["code"], code, "{what}: {v}");
}

fn assert_forbidden_jupyter(status: u16, body: &[u8], what: &str) -> String {
    let v = json_of(body);
    assert_eq!(status, 403, "{what}: {v}");
    assert_detail(status, &v, 403)
}

/// `/jupyter/execute` as `key`; the URLs of the files it returned, by filename.
async fn jupyter_files(app: &TestApp, code: &str, key: &str) -> std::collections::BTreeMap<String, String> {
    let body = json!({"code": code, "execution_environment": "python", "timeout": 60});
    let (status, v) = post_json_with(app, "/jupyter/execute", body, Some(key)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["error"], Value::Null, "{v}");
    let files = v["files"].as_array().unwrap_or_else(|| panic!("files: {v}"));
    files.iter().map(|f| (f["filename"].as_str().unwrap().to_owned(), f["url"].as_str().unwrap().to_owned())).collect()
}

/// A `/v1` session of `key`'s that displayed a plot, saved as a file: the session and the plot's link.
async fn v1_plot(app: &TestApp, key: &str) -> (String, V1Link) {
    let id = app.start_as(key, "python").await;
    let r = app
        .client
        .post(app.url(&format!("/v1/sessions/{id}/execute")))
        .bearer_auth(key)
        .json(&json!({"code": PLOT, "images": "files"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let url = v["files"][0]["url"].as_str().unwrap_or_else(|| panic!("a file link: {v}"));
    assert!(url.starts_with(&format!("/v1/sessions/{id}/files/outputs/")), "{url}");
    (id, V1Link::parse(url))
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_links_open_their_one_file_without_a_key_and_nothing_else() {
    let app = spawn_app_with(AppOptions { api_keys: vec![ALPHA.into(), BETA.into()], ..Default::default() }).await;
    let now = chrono::Utc::now().timestamp();

    // --- /jupyter: what an execution wrote and displayed.
    let code = format!("{PLOT}\nopen('out.csv', 'w').write('a,b\\n1,2\\n')");
    let files = jupyter_files(&app, &code, ALPHA).await;
    let (png, csv) = (JupyterLink::parse(&files["image_1.png"]), JupyterLink::parse(&files["out.csv"]));
    assert_eq!(png.base, app.base);
    assert!(files["out.csv"].ends_with(&format!("/{}", csv.name)), "the stored name stays the URL's last part");
    assert!((now + 1200..=now + 1260).contains(&csv.expires), "as long as the file lives (20 min): {}", csv.expires);
    let (status, bytes) = open(&png.url(), None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    assert!(bytes.starts_with(PNG_MAGIC), "the PNG, without a key");
    assert_eq!(open(&csv.url(), None).await, (200, b"a,b\n1,2\n".to_vec()));

    // Altered: another file under this signature, another expiry, another signature.
    let other_file = JupyterLink { name: csv.name.clone(), ..JupyterLink::parse(&png.url()) };
    let (status, body) = open(&other_file.url(), None).await;
    let detail = assert_forbidden_jupyter(status, &body, "another file under a file's signature");
    assert!(detail.contains("signature"), "{detail}");
    let later = JupyterLink { expires: csv.expires + 3600, ..JupyterLink::parse(&csv.url()) };
    let (status, body) = open(&later.url(), None).await;
    assert_forbidden_jupyter(status, &body, "a later expiry");
    let forged = JupyterLink { signature: flipped(&csv.signature), ..JupyterLink::parse(&csv.url()) };
    let (status, body) = open(&forged.url(), None).await;
    assert_forbidden_jupyter(status, &body, "an altered signature");
    let garbage = JupyterLink { signature: "not-a-signature".into(), ..JupyterLink::parse(&csv.url()) };
    let (status, body) = open(&garbage.url(), None).await;
    assert_forbidden_jupyter(status, &body, "a signature of the wrong shape");
    let (status, body) =
        open(&format!("{}/jupyter/files/signed/soon/{}/{}", app.base, csv.signature, csv.name), None).await;
    assert_forbidden_jupyter(status, &body, "an expiry that is not a time");

    // Another owner's file: beta's upload opens by its own link, never by alpha's signature.
    let upload = json!({"filename": "beta", "extension": "txt", "content": base64::engine::general_purpose::STANDARD.encode("beta's")});
    let r = app.client.put(app.url("/jupyter/files")).bearer_auth(BETA).json(&upload).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let betas = JupyterLink::parse(r.json::<Value>().await.unwrap()["url"].as_str().unwrap());
    assert_eq!(open(&betas.url(), None).await, (200, b"beta's".to_vec()));
    let stolen = JupyterLink { name: betas.name.clone(), ..JupyterLink::parse(&csv.url()) };
    let (status, body) = open(&stolen.url(), None).await;
    assert_forbidden_jupyter(status, &body, "alpha's signature on beta's file");

    // The key still works as before, and decides when it is sent: alpha's key finds no file of beta's.
    assert_eq!(open(&csv.plain(), Some(ALPHA)).await, (200, b"a,b\n1,2\n".to_vec()));
    assert_eq!(open(&csv.url(), Some(ALPHA)).await.0, 200);
    assert_eq!(open(&forged.url(), Some(ALPHA)).await.0, 200, "with the key the link is not looked at");
    assert_eq!(open(&betas.url(), Some(ALPHA)).await.0, 404);
    assert_eq!(open(&csv.plain(), None).await.0, 401, "the plain URL still needs the key");
    assert_eq!(open(&csv.url(), Some("not-a-key")).await.0, 401);
    assert_eq!(open(&csv.url(), None).await.0, 200, "the untampered link still opens: the 403s were the tampering's");

    // --- /v1: an image saved as a file.
    let (alpha_session, link) = v1_plot(&app, ALPHA).await;
    assert!(link.expires > now && link.expires <= chrono::Utc::now().timestamp() + 86400, "at most the session's life");
    let (status, bytes) = open(&link.url(&app), None).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    assert!(bytes.starts_with(PNG_MAGIC));
    // Another file of the same session under the image's signature.
    let r = app
        .client
        .put(app.url(&format!("/v1/sessions/{alpha_session}/files/secret.txt")))
        .bearer_auth(ALPHA)
        .body("alpha's secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let other_file = V1Link {
        path: format!("/v1/sessions/{alpha_session}/files/secret.txt"),
        ..V1Link::parse(&link.url(&app)[app.base.len()..])
    };
    let (status, body) = open(&other_file.url(&app), None).await;
    assert_forbidden_v1(status, &body, "invalid_signature", "another file under the image's signature");
    let later = V1Link { expires: link.expires + 60, ..V1Link::parse(&link.url(&app)[app.base.len()..]) };
    let (status, body) = open(&later.url(&app), None).await;
    assert_forbidden_v1(status, &body, "invalid_signature", "a later expiry");
    let forged = V1Link { signature: flipped(&link.signature), ..V1Link::parse(&link.url(&app)[app.base.len()..]) };
    let (status, body) = open(&forged.url(&app), None).await;
    assert_forbidden_v1(status, &body, "invalid_signature", "an altered signature");
    let (status, body) = open(&app.url(&format!("{}?expires={}", link.path, link.expires)), None).await;
    assert_forbidden_v1(status, &body, "invalid_link", "an expiry without a signature");

    // Another owner's file: beta's image, by its own link only.
    let (beta_session, betas) = v1_plot(&app, BETA).await;
    let (status, bytes) = open(&betas.url(&app), None).await;
    assert!(status == 200 && bytes.starts_with(PNG_MAGIC), "beta's link opens beta's image: {status}");
    let stolen = V1Link { path: betas.path.clone(), ..V1Link::parse(&link.url(&app)[app.base.len()..]) };
    let (status, body) = open(&stolen.url(&app), None).await;
    assert_forbidden_v1(status, &body, "invalid_signature", "alpha's signature on beta's file");
    let same_path = link.path.replace(&alpha_session, &beta_session);
    let moved = V1Link { path: same_path, ..V1Link::parse(&link.url(&app)[app.base.len()..]) };
    let (status, body) = open(&moved.url(&app), None).await;
    assert_forbidden_v1(status, &body, "invalid_signature", "alpha's link moved to beta's session");

    // It only reads: the same link cannot delete or replace the file.
    let r = browser().delete(link.url(&app)).send().await.unwrap();
    assert_eq!(r.status(), 401, "a link is no key for DELETE");
    let r = browser().put(link.url(&app)).body("replaced").send().await.unwrap();
    assert_eq!(r.status(), 401, "nor for PUT");
    assert!(open(&link.url(&app), None).await.1.starts_with(PNG_MAGIC), "the file is untouched");

    // The key works as before on the plain URL; without it the plain URL is refused.
    assert_eq!(open(&app.url(&link.path), Some(ALPHA)).await.0, 200);
    assert_eq!(open(&app.url(&link.path), None).await.0, 401);
    assert_eq!(open(&link.url(&app), Some(BETA)).await.0, 404, "beta's key, alpha's session: the key decides");

    // A deleted session's link finds nothing.
    let r =
        app.client.delete(app.url(&format!("/v1/sessions/{alpha_session}"))).bearer_auth(ALPHA).send().await.unwrap();
    assert_eq!(r.status(), 204);
    let (status, body) = open(&link.url(&app), None).await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    assert_error_shape(&json_of(&body), "not_found");
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_links_expire_and_the_key_still_opens_the_file() {
    let app = spawn_app_with(AppOptions {
        api_keys: vec![ALPHA.into()],
        links: signed_urls(&["--signed-url-max-s", "4"]),
        ..Default::default()
    })
    .await;
    let (_, link) = v1_plot(&app, ALPHA).await;
    let made = chrono::Utc::now().timestamp();
    assert!(link.expires <= made + 4, "the configured maximum: {} at {made}", link.expires);
    let (status, bytes) = open(&link.url(&app), None).await;
    assert!(status == 200 && bytes.starts_with(PNG_MAGIC), "fresh, it opens: {status}");

    let files = jupyter_files(&app, PLOT, ALPHA).await;
    let png = JupyterLink::parse(&files["image_1.png"]);
    let made = chrono::Utc::now().timestamp();
    assert!(png.expires <= made + 4, "the configured maximum, not the file's 20 minutes: {}", png.expires);
    let (status, bytes) = open(&png.url(), None).await;
    assert!(status == 200 && bytes.starts_with(PNG_MAGIC), "fresh, it opens: {status}");

    // Past their expiry both are refused and say why; the key still opens both files.
    let wait = png.expires.max(link.expires) + 1 - chrono::Utc::now().timestamp();
    assert!(wait <= 6, "{wait}");
    tokio::time::sleep(Duration::from_secs(wait.max(0) as u64)).await;
    let (status, body) = open(&link.url(&app), None).await;
    assert_forbidden_v1(status, &body, "link_expired", "an expired /v1 link");
    let (status, body) = open(&png.url(), None).await;
    let detail = assert_forbidden_jupyter(status, &body, "an expired /jupyter link");
    assert!(detail.contains("expired"), "{detail}");
    assert_eq!(open(&link.url(&app), Some(ALPHA)).await.0, 200);
    assert_eq!(open(&png.url(), Some(ALPHA)).await.0, 200);
    assert_eq!(open(&png.plain(), Some(ALPHA)).await.0, 200);
}
