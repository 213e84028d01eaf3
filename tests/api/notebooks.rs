//! The notebook the service keeps per session, images saved as files, and the datasets folder.

use serde_json::{Value, json};

use crate::helpers::*;

/// A 1×1 PNG.
const PNG_B64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

fn show_png_and_svg() -> String {
    format!(
        "import base64\nfrom IPython.display import Image, SVG, display\n\
         display(Image(data=base64.b64decode('{PNG_B64}')))\ndisplay(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"4\" height=\"4\"/>'))\nprint('shown')"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_execution_is_a_cell_of_the_sessions_notebook_which_nbformat_accepts() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    app.exec(&id, "x = 6 * 7\nprint('x is', x)").await;
    app.exec(&id, "1 / 0").await;
    app.exec(&id, &show_png_and_svg()).await;
    app.exec(&id, "x").await;

    let r = app.client.get(app.url(&format!("/v1/sessions/{id}/notebook"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ipynb+json");
    let bytes = r.bytes().await.unwrap();
    let nb: Value = serde_json::from_slice(&bytes).expect("the notebook is JSON");
    let cells = nb["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 4);
    assert_eq!(cells[0]["source"], "x = 6 * 7\nprint('x is', x)");
    assert_eq!(cells[0]["outputs"][0], json!({"output_type": "stream", "name": "stdout", "text": "x is 42\n"}));
    assert_eq!(cells[1]["outputs"][0]["output_type"], "error");
    assert_eq!(cells[1]["outputs"][0]["ename"], "ZeroDivisionError");
    assert_eq!(cells[2]["outputs"][0]["data"]["image/png"].as_str().map(|s| s.trim()), Some(PNG_B64));
    assert_eq!(cells[3]["outputs"][0]["data"]["text/plain"], "42");
    let counts: Vec<Value> = cells.iter().map(|c| c["execution_count"].clone()).collect();
    assert_eq!(counts, vec![json!(1), json!(2), json!(3), json!(4)]);
    assert_eq!(nb["metadata"]["kernelspec"]["name"], "python");

    // nbformat itself (PyPI) reads it and validates it against its JSON schema.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n.ipynb");
    std::fs::write(&path, &bytes).unwrap();
    let python = tokio::task::spawn_blocking(|| tool_python("nbformat-venv", &["nbformat==5.10.4"])).await.unwrap();
    let check = std::process::Command::new(python)
        .args(["-c", "import nbformat, sys\nnb = nbformat.read(sys.argv[1], as_version=4)\nnbformat.validate(nb)\nprint(len(nb.cells), nb.nbformat, nb.nbformat_minor)"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(check.status.success(), "nbformat refused it: {}", String::from_utf8_lossy(&check.stderr));
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "4 4 5");

    // The notebook is the service's, on the host; a /v1 session's goes with the session.
    let on_disk = app.state_dir.join("notebooks").join("sessions").join(format!("{id}.ipynb"));
    assert!(on_disk.is_file());
    assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204);
    assert!(!on_disk.exists(), "a /v1 session's notebook is removed with it");
    let (status, _) = app.get(&format!("/v1/sessions/{id}/notebook")).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn images_come_back_inline_or_as_files_as_the_caller_asks() {
    let app = spawn_app().await;
    let id = app.start("python").await;

    let inline = app.exec(&id, &show_png_and_svg()).await;
    assert_eq!(display_mimes(&inline).iter().filter(|m| m.starts_with("image/")).count(), 2, "{inline}");
    assert!(inline.get("files").is_none());

    let (status, v) = app.exec_with(&id, json!({"code": show_png_and_svg(), "images": "files"})).await;
    assert_eq!(status, 200, "{v}");
    assert!(display_mimes(&v).iter().all(|m| !m.starts_with("image/")), "the images left the outputs: {v}");
    let files = v["files"].as_array().expect("files listed");
    assert_eq!(files.len(), 2, "{v}");
    assert_eq!(files[0]["mime"], "image/png");
    assert_eq!(files[1]["mime"], "image/svg+xml");
    let png_url = files[0]["url"].as_str().unwrap();
    assert!(png_url.starts_with(&format!("/v1/sessions/{id}/files/outputs/")), "{png_url}");
    let r = app.client.get(app.url(png_url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/png");
    let png = r.bytes().await.unwrap();
    use base64::Engine;
    assert_eq!(png.as_ref(), base64::engine::general_purpose::STANDARD.decode(PNG_B64).unwrap().as_slice());
    let svg = app.client.get(app.url(files[1]["url"].as_str().unwrap())).send().await.unwrap().text().await.unwrap();
    assert!(svg.contains("<svg"), "{svg}");

    let (status, v) = app.exec_with(&id, json!({"code": "1", "images": "sideways"})).await;
    assert!((400..500).contains(&status), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_datasets_folder_is_mounted_read_only_at_mnt_data() {
    let datasets = tempfile::Builder::new().prefix("kbdata").tempdir_in("/tmp").unwrap();
    std::fs::write(datasets.path().join("iris.csv"), "sepal,petal\n5.1,1.4\n").unwrap();
    // Sessions run as uid 1000: the folder must be readable by others (a temp dir is 0700).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(datasets.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut options = AppOptions::default();
    options.storage.datasets = kernelbox::config::StateFolder::At(datasets.path().to_path_buf());
    let app = spawn_app_with(options).await;
    let id = app.start("python").await;
    let v = app
        .exec(
            &id,
            "print(open('/mnt/data/iris.csv').read(), end='')\ntry:\n    open('/mnt/data/new.csv', 'w')\nexcept OSError as e:\n    print('refused', e.errno)",
        )
        .await;
    let text: String = v["stdout"].as_str().unwrap().to_owned();
    assert_eq!(text, "sepal,petal\n5.1,1.4\nrefused 30\n", "{v}");
    let mut names: Vec<String> =
        std::fs::read_dir(datasets.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["iris.csv", "output"], "nothing new on the host but the output folders' mountpoint");
    assert_eq!(std::fs::read_dir(datasets.path().join("output")).unwrap().count(), 0, "and it is empty");
}
