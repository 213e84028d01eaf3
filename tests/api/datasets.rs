//! The datasets folder: there by default (`<state>/datasets`, made empty) and read-only at `/mnt/data` in
//! every session, or off with `--datasets-dir none`.

use kernelbox::config::StateFolder;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread")]
async fn datasets_a_default_install_has_a_read_only_mnt_data() {
    let app = spawn_app().await;
    let datasets = app.state_dir.join("datasets");
    assert_eq!(app.manager.datasets_dir(), Some(datasets.as_path()));
    assert!(datasets.is_dir() && datasets.join("output").is_dir(), "made at start-up");
    let id = app.start("python").await;

    // Listed empty (but for the output folder's mountpoint), then a file put there on the host is read.
    let list = "import os\nprint(sorted(os.listdir('/mnt/data')), os.listdir('/mnt/data/output'))";
    assert_eq!(app.exec(&id, list).await["stdout"], "['output'] []\n");
    std::fs::write(datasets.join("iris.csv"), "sepal,petal\n5.1,1.4\n").unwrap();
    // Writable by anyone as a file: only the mount stands in the way.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(datasets.join("iris.csv"), std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(app.exec(&id, list).await["stdout"], "['iris.csv', 'output'] []\n");
    assert_eq!(
        app.exec(&id, "print(open('/mnt/data/iris.csv').read(), end='')").await["stdout"],
        "sepal,petal\n5.1,1.4\n"
    );

    // Read-only: every write is EROFS (30), in the folder and in its output/ alike.
    let writes = "import os\nfor p in ['/mnt/data/new.csv', '/mnt/data/iris.csv', '/mnt/data/output/x.png']:\n    \
                  try:\n        open(p, 'a')\n    except OSError as e:\n        print(e.errno)\n\
                  for f in (lambda: os.mkdir('/mnt/data/d'), lambda: os.remove('/mnt/data/iris.csv')):\n    \
                  try:\n        f()\n    except OSError as e:\n        print(e.errno)";
    assert_eq!(app.exec(&id, writes).await["stdout"], "30\n30\n30\n30\n30\n");
    let mounts =
        app.exec(&id, "print([l.split()[3].split(',')[0] for l in open('/proc/mounts') if ' /mnt/data' in l])").await;
    assert_eq!(mounts["stdout"], "['ro', 'ro']\n", "{mounts}");
    let mut names: Vec<String> =
        std::fs::read_dir(&datasets).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["iris.csv", "output"], "nothing new on the host");
    assert_eq!(std::fs::read_dir(datasets.join("output")).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn datasets_none_turns_mnt_data_off() {
    let mut options = AppOptions::default();
    options.storage.datasets = StateFolder::parse("none").unwrap();
    let app = spawn_app_with(options).await;
    assert_eq!(app.manager.datasets_dir(), None);
    assert!(!app.state_dir.join("datasets").exists(), "nothing made");
    let id = app.start("python").await;
    let v = app
        .exec(
            &id,
            "import os\nprint(os.path.exists('/mnt/data'), any(' /mnt/data' in l for l in open('/proc/mounts')))",
        )
        .await;
    assert_eq!(v["stdout"], "False False\n", "{v}");
}
