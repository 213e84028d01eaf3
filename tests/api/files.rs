//! Files in and out of a session's working directory: upload, download, listing, delete, and every way a
//! path could try to leave the working directory. Real containers: the transfer runs inside them.

use serde_json::{Value, json};

use crate::helpers::*;

fn files_url(app: &TestApp, id: &str, path: &str) -> String {
    app.url(&format!("/v1/sessions/{id}/files/{path}"))
}

async fn put(app: &TestApp, id: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    let r = app.client.put(files_url(app, id, path)).body(body).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get_bytes(app: &TestApp, id: &str, path: &str) -> (u16, String, Vec<u8>) {
    let r = app.client.get(files_url(app, id, path)).send().await.expect("request");
    let status = r.status().as_u16();
    let ctype = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, ctype, r.bytes().await.expect("body").to_vec())
}

async fn list(app: &TestApp, id: &str, dir: &str) -> (u16, Value) {
    let query: String = dir
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let r = app.client.get(app.url(&format!("/v1/sessions/{id}/files?path={query}"))).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn names(listing: &Value) -> Vec<String> {
    listing["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap().to_owned()).collect()
}

fn entry<'a>(listing: &'a Value, name: &str) -> &'a Value {
    listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {listing}"))
}

fn stdout(v: &Value) -> String {
    v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["output_type"] == "stream")
        .map(|o| o["text"].as_str().unwrap_or(""))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn files_go_in_and_out_of_a_session_and_the_kernel_sees_them() {
    let app = spawn_app().await;
    let id = app.start("python").await;

    // Upload: text into a new directory, and 3 MiB of every byte value.
    let (status, w) = put(&app, &id, "data/hello.txt", b"hello from the client\n".to_vec()).await;
    assert_eq!(status, 201, "{w}");
    assert_eq!(w["path"], "data/hello.txt");
    assert_eq!(w["size"], 22);
    let blob: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i * 7 % 256) as u8).collect();
    assert_eq!(put(&app, &id, "data/blob.bin", blob.clone()).await.0, 201);

    // The kernel reads them in its working directory, and writes one back.
    let v = app
        .exec(
            &id,
            "import hashlib\nprint(open('data/hello.txt').read(), end='')\nb = open('data/blob.bin','rb').read()\n\
             print(len(b), hashlib.sha256(b).hexdigest())\nopen('out.csv','w').write('a,b\\n1,2\\n')",
        )
        .await;
    let expected_digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, &blob));
    assert_eq!(stdout(&v), format!("hello from the client\n{} {expected_digest}\n", blob.len()));

    // Download: exact bytes, a content type from the name, and headers that keep a browser from running it.
    let (status, ctype, bytes) = get_bytes(&app, &id, "out.csv").await;
    assert_eq!((status, ctype.as_str(), bytes.as_slice()), (200, "text/csv; charset=utf-8", b"a,b\n1,2\n".as_slice()));
    let (status, _, bytes) = get_bytes(&app, &id, "data/blob.bin").await;
    assert_eq!(status, 200);
    assert!(bytes == blob, "the blob comes back byte for byte");
    let r = app.client.get(files_url(&app, &id, "out.csv")).send().await.unwrap();
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert!(r.headers()["content-security-policy"].to_str().unwrap().contains("sandbox"));
    assert!(r.headers()["content-disposition"].to_str().unwrap().contains("out.csv"));

    // Listing: name, size, kind, mtime.
    let (status, root) = list(&app, &id, "").await;
    assert_eq!(status, 200, "{root}");
    assert!(names(&root).contains(&"data".to_owned()) && names(&root).contains(&"out.csv".to_owned()), "{root}");
    assert_eq!(entry(&root, "data")["kind"], "directory");
    assert_eq!(entry(&root, "out.csv")["kind"], "file");
    assert_eq!(entry(&root, "out.csv")["size"], 8);
    assert!(entry(&root, "out.csv")["mtime"].as_f64().unwrap() > 1.7e9);
    let (_, data) = list(&app, &id, "data").await;
    assert_eq!(names(&data), vec!["blob.bin", "hello.txt"]);
    assert_eq!(entry(&data, "blob.bin")["size"], blob.len());

    // Replacing a file, then deleting a file and a directory.
    assert_eq!(put(&app, &id, "out.csv", b"x".to_vec()).await.0, 201);
    assert_eq!(get_bytes(&app, &id, "out.csv").await.2, b"x");
    assert_eq!(app.client.delete(files_url(&app, &id, "out.csv")).send().await.unwrap().status(), 204);
    assert_eq!(get_bytes(&app, &id, "out.csv").await.0, 404);
    assert_eq!(app.client.delete(files_url(&app, &id, "data")).send().await.unwrap().status(), 204);
    let (_, root) = list(&app, &id, "").await;
    assert!(!names(&root).contains(&"data".to_owned()), "{root}");

    // Errors: a missing file, a directory as a file, a file as a directory, an unknown session.
    let (status, v) = list(&app, &id, "nope").await;
    assert_eq!(status, 404, "{v}");
    assert_error_shape(&v, "file_not_found");
    assert_eq!(put(&app, &id, "d/f.txt", b"1".to_vec()).await.0, 201);
    let (status, _, body) = get_bytes(&app, &id, "d").await;
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    let (status, v) = list(&app, &id, "d/f.txt").await;
    assert_eq!(status, 409, "{v}");
    let (status, v) = put(&app, &id, "d", b"1".to_vec()).await;
    assert_eq!(status, 409, "a directory is not overwritten by a file: {v}");
    let (status, v) = list(&app, "0123456789abcdef01234567", "").await;
    assert_eq!(status, 404, "{v}");
    assert_error_shape(&v, "not_found");

    assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204);
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_that_would_leave_the_working_directory_are_refused() {
    let app = spawn_app().await;
    let id = app.start("bash").await;
    let long = "a".repeat(256);
    // (path as sent in the URL, what it decodes to)
    let refused = [
        "..%2Fetc%2Fpasswd",
        "a%2F..%2F..%2Fetc%2Fpasswd",
        "a/../../etc/passwd",
        "%2Fetc%2Fpasswd",
        "nul%00byte",
        "new%0Aline",
        long.as_str(),
    ];
    for path in refused {
        for method in ["GET", "PUT", "DELETE"] {
            let req = app.client.request(method.parse().unwrap(), files_url(&app, &id, path));
            let req = if method == "PUT" { req.body("x") } else { req };
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            assert!((400..500).contains(&status), "{method} {path}: {status} {body}");
            assert!(body["error"]["code"].is_string(), "{method} {path}: {body}");
        }
        let (status, v) = list(&app, &id, &path.replace("%2F", "/").replace("%00", "\0").replace("%0A", "\n")).await;
        assert!((400..500).contains(&status), "list {path}: {status} {v}");
    }
    // Nothing was written anywhere it could have been.
    let v = app.exec(&id, "ls -a ~ /tmp | tr '\\n' ' '").await;
    assert!(!stdout(&v).contains("passwd") && !stdout(&v).contains("byte"), "{v}");
    let v = app.exec(&id, "head -c 4 /etc/passwd").await;
    assert_eq!(stdout(&v).trim(), "root", "/etc/passwd is untouched");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planted_symlink_pointing_outside_is_never_followed() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    app.exec(
        &id,
        "import os\nos.symlink('/etc/passwd', 'pw')\nos.symlink('/etc', 'etc')\nos.symlink('/tmp', 'tmp')\n\
         os.symlink('inside.txt', 'good')\nopen('inside.txt','w').write('in')\nopen('/tmp/secret','w').write('s')",
    )
    .await;

    // Reading through a link that leads out: refused, whether it names a file or a directory on the way.
    for path in ["pw", "etc/passwd", "etc/hostname", "tmp/secret"] {
        let (status, _, body) = get_bytes(&app, &id, path).await;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        assert_eq!(status, 403, "GET {path}: {v}");
        assert_error_shape(&v, "outside_working_directory");
    }
    for dir in ["etc", "tmp"] {
        let (status, v) = list(&app, &id, dir).await;
        assert_eq!(status, 403, "list {dir}: {v}");
    }
    // Writing through one: refused, and nothing appears where it points.
    let (status, v) = put(&app, &id, "tmp/planted.txt", b"x".to_vec()).await;
    assert_eq!(status, 403, "{v}");
    let (status, v) = put(&app, &id, "tmp/sub/planted.txt", b"x".to_vec()).await;
    assert_eq!(status, 403, "{v}");
    // A link that stays inside works.
    assert_eq!(get_bytes(&app, &id, "good").await.2, b"in");

    // The listing shows the links as links, not what they point to.
    let (_, root) = list(&app, &id, "").await;
    assert_eq!(entry(&root, "pw")["kind"], "symlink");
    assert_eq!(entry(&root, "etc")["kind"], "symlink");

    // Deleting a link removes the link, never its target.
    for link in ["pw", "etc", "tmp"] {
        assert_eq!(app.client.delete(files_url(&app, &id, link)).send().await.unwrap().status(), 204, "{link}");
    }
    let v = app
        .exec(&id, "import os\nprint(os.path.exists('/etc/passwd'), os.path.exists('/tmp/secret'), os.path.exists('/tmp/planted.txt'), sorted(os.listdir('.')))")
        .await;
    assert_eq!(stdout(&v), "True True False ['good', 'inside.txt']\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_over_the_limit_are_413_and_a_full_disk_is_507_leaving_the_session_well() {
    let app = spawn_app_with(AppOptions { limits: limits(&["--max-upload-mb", "48"]), ..Default::default() }).await;
    // 256 MB of memory: each tmpfs is 64 MB.
    let id = app.start_with(json!({"language": "python", "memory_mb": 256})).await;

    // Announced too large: refused before a byte is taken.
    let (status, v) = put(&app, &id, "big.bin", vec![0u8; 49 << 20]).await;
    assert_eq!(status, 413, "{v}");
    assert_error_shape(&v, "too_large");
    // Streamed with no length, growing past the limit: refused as it crosses.
    let chunks = futures::stream::iter((0..60).map(|_| Ok::<_, std::io::Error>(vec![1u8; 1 << 20])));
    let r =
        app.client.put(files_url(&app, &id, "big.bin")).body(reqwest::Body::wrap_stream(chunks)).send().await.unwrap();
    assert_eq!(r.status(), 413);

    // The disk fills: 45 MB fits once in 64 MB, not twice.
    assert_eq!(put(&app, &id, "one.bin", vec![1u8; 45 << 20]).await.0, 201);
    let (status, v) = put(&app, &id, "two.bin", vec![2u8; 45 << 20]).await;
    assert_eq!(status, 507, "{v}");
    assert_error_shape(&v, "disk_full");

    // Nothing half-written is left, and the kernel is fine.
    let (_, root) = list(&app, &id, "").await;
    assert_eq!(names(&root), vec!["one.bin"], "no partial file: {root}");
    let v = app.exec(&id, "import os\nprint(os.path.getsize('one.bin'))").await;
    assert_eq!(stdout(&v), format!("{}\n", 45 << 20));
    assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204);
}

#[tokio::test(flavor = "multi_thread")]
async fn another_keys_session_files_are_not_found() {
    let app = spawn_app_with(AppOptions { api_keys: vec!["key-a".into(), "key-b".into()], ..Default::default() }).await;
    let id = app.start_as("key-a", "bash").await;
    let ok = app.client.put(files_url(&app, &id, "a.txt")).bearer_auth("key-a").body("mine").send().await.unwrap();
    assert_eq!(ok.status(), 201);
    for req in [
        app.client.get(files_url(&app, &id, "a.txt")),
        app.client.put(files_url(&app, &id, "a.txt")).body("theirs"),
        app.client.delete(files_url(&app, &id, "a.txt")),
        app.client.get(app.url(&format!("/v1/sessions/{id}/files"))),
    ] {
        let r = req.bearer_auth("key-b").send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
    let r = app.client.get(files_url(&app, &id, "a.txt")).send().await.unwrap();
    assert_eq!(r.status(), 401, "no key at all");
    let mine = app.client.get(files_url(&app, &id, "a.txt")).bearer_auth("key-a").send().await.unwrap();
    assert_eq!(mine.bytes().await.unwrap().as_ref(), b"mine");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_deleted_under_a_transfer_is_a_conflict_not_a_server_error() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    // An upload that dribbles in for ~10 s.
    let chunks = futures::stream::unfold(0u32, |i| async move {
        if i == 100 {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        Some((Ok::<_, std::io::Error>(vec![7u8; 64 << 10]), i + 1))
    });
    let upload = app.client.put(files_url(&app, &id, "slow.bin")).body(reqwest::Body::wrap_stream(chunks)).send();
    let delete = async {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        app.delete(&format!("/v1/sessions/{id}")).await
    };
    let (uploaded, deleted) = tokio::join!(upload, delete);
    assert_eq!(deleted, 204);
    if let Ok(r) = uploaded {
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert!((400..500).contains(&status), "a transfer cut by DELETE: {status} {body}");
    }
    assert!(app.containers().await.is_empty());
}
