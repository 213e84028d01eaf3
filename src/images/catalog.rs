//! The languages kernelbox offers and the image each one runs in.

/// Label keys on kernel images (set by the Dockerfiles, except the hash and base id set by the builder).
pub const LABEL_LANGUAGE: &str = "kernelbox.image.language";
pub const LABEL_DISPLAY_NAME: &str = "kernelbox.image.display_name";
pub const LABEL_LANGUAGE_VERSION: &str = "kernelbox.image.language_version";
pub const LABEL_INTERRUPT_MODE: &str = "kernelbox.image.interrupt_mode";
pub const LABEL_CONTENT_HASH: &str = "kernelbox.image.content_hash";
pub const LABEL_BASE_ID: &str = "kernelbox.image.base_id";

/// The image that holds the start contract (`start-kernel`, built from `images/supervisor/start-kernel/`,
/// and the file tool); every language image copies it in its last layer.
pub const SUPERVISOR: &str = "supervisor";
/// The build argument that names the supervisor image in a language image's Dockerfile.
pub const SUPERVISOR_ARG: &str = "KERNELBOX_SUPERVISOR";

/// The start contract: every image runs its kernel with `START_KERNEL <connection file>`.
pub const START_KERNEL: &str = "/opt/kernelbox/start-kernel";
/// The start contract: the file tool (`images/shared/files`) the service runs through Docker's exec API.
pub const FILES_TOOL: &str = "/opt/kernelbox/files";
/// The kernel user's home and working directory (a tmpfs owned by uid 1000 at run time).
pub const HOME: &str = "/home/kernel";

/// A language clients can ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Language {
    pub name: String,
    /// The image (folder under `images/`) it runs in; `typescript` shares `javascript`'s.
    pub image: String,
}

impl Language {
    /// The programming language, as a notebook's `language_info` names it.
    pub fn programming_language(&self) -> &str {
        match self.name.as_str() {
            "python" | "python_scientific" => "python",
            other => other,
        }
    }

    /// How long output of an execution may still come after its reply and idle status. Deno's kernel
    /// publishes `console.log` output from a task of its own and only waits 5 ms after its reply for it
    /// (denoland/deno#20337), so on a busy host the output can follow the idle status: a `/v1` execution
    /// of JavaScript or TypeScript keeps listening that long after both (measured: 1 in 100 `console.log`
    /// lost under two busy loops without it). Zero for kernels that keep the protocol's order.
    pub fn late_output(&self) -> std::time::Duration {
        match self.image.as_str() {
            "javascript" => std::time::Duration::from_millis(50),
            _ => std::time::Duration::ZERO,
        }
    }

    /// A name for people (a notebook's kernelspec `display_name`).
    pub fn display_name(&self) -> String {
        match self.name.as_str() {
            "python" => "Python 3".into(),
            "python_scientific" => "Python 3 (scientific)".into(),
            "javascript" => "JavaScript (Deno)".into(),
            "typescript" => "TypeScript (Deno)".into(),
            "java" => "Java".into(),
            "bash" => "Bash".into(),
            other => other.into(),
        }
    }
}

/// The languages clients can ask for, and the image (folder under `images/`) each runs in.
pub const LANGUAGES: &[(&str, &str)] = &[
    ("python", "python"),
    ("python_scientific", "python_scientific"),
    ("javascript", "javascript"),
    ("typescript", "javascript"),
    ("java", "java"),
    ("bash", "bash"),
];

/// An image kernelbox builds, and what it is built on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageDef {
    pub name: &'static str,
    /// The image it is `FROM`: `None` for the base, which starts from the configured base image.
    pub parent: Option<&'static str>,
    /// The build argument that names the parent.
    pub parent_arg: &'static str,
    /// Whether the files of `images/shared/` (the file tool) join its build context: only the supervisor's.
    pub shared: bool,
    /// Whether it copies the start contract from the [`SUPERVISOR`] image (named by [`SUPERVISOR_ARG`]) in
    /// its last layer: every language image, so changing `start-kernel` rebuilds only that layer.
    pub supervised: bool,
}

/// Every image, parents before children.
pub const IMAGES: &[ImageDef] = &[
    ImageDef { name: "base", parent: None, parent_arg: "BASE_IMAGE", shared: false, supervised: false },
    // start-kernel (compiled with Debian's rustc in a build stage FROM base) and the file tool, in an image
    // FROM scratch that holds nothing else.
    ImageDef { name: SUPERVISOR, parent: Some("base"), parent_arg: "KERNELBOX_BASE", shared: true, supervised: false },
    // The python images' common layers, without start-kernel: a change to start-kernel then rebuilds only
    // the last layer of python_scientific too, not its scientific stack.
    ImageDef {
        name: "python_core",
        parent: Some("base"),
        parent_arg: "KERNELBOX_BASE",
        shared: false,
        supervised: false,
    },
    ImageDef {
        name: "python",
        parent: Some("python_core"),
        parent_arg: "KERNELBOX_PYTHON_CORE",
        shared: false,
        supervised: true,
    },
    ImageDef {
        name: "python_scientific",
        parent: Some("python_core"),
        parent_arg: "KERNELBOX_PYTHON_CORE",
        shared: false,
        supervised: true,
    },
    ImageDef {
        name: "javascript",
        parent: Some("base"),
        parent_arg: "KERNELBOX_BASE",
        shared: false,
        supervised: true,
    },
    ImageDef { name: "java", parent: Some("base"), parent_arg: "KERNELBOX_BASE", shared: false, supervised: true },
    ImageDef { name: "bash", parent: Some("base"), parent_arg: "KERNELBOX_BASE", shared: false, supervised: true },
];

pub fn image_def(name: &str) -> Option<&'static ImageDef> {
    IMAGES.iter().find(|d| d.name == name)
}

/// The languages and where their images are.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub prefix: String,
    pub languages: Vec<Language>,
}

impl Catalog {
    pub fn new(prefix: &str) -> Self {
        Catalog {
            prefix: prefix.to_owned(),
            languages: LANGUAGES
                .iter()
                .map(|(name, image)| Language { name: (*name).into(), image: (*image).into() })
                .collect(),
        }
    }

    pub fn language(&self, name: &str) -> Option<&Language> {
        self.languages.iter().find(|l| l.name == name)
    }

    /// `<prefix><image>:latest`.
    pub fn image_ref(&self, image: &str) -> String {
        format!("{}{image}:latest", self.prefix)
    }

    /// The images the languages need (no duplicates, no base).
    pub fn language_images(&self) -> Vec<String> {
        let mut images: Vec<String> = Vec::new();
        for l in &self.languages {
            if !images.contains(&l.image) {
                images.push(l.image.clone());
            }
        }
        images
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typescript_runs_in_the_javascript_image() {
        let c = Catalog::new("kernelbox/kernel-");
        assert_eq!(c.language("typescript").unwrap().image, "javascript");
        assert_eq!(c.image_ref("javascript"), "kernelbox/kernel-javascript:latest");
        assert_eq!(c.language_images().len(), 5);
        assert!(c.language("cobol").is_none());
    }

    #[test]
    fn every_parent_comes_before_its_children() {
        for (i, def) in IMAGES.iter().enumerate() {
            if let Some(parent) = def.parent {
                let p = IMAGES.iter().position(|d| d.name == parent).unwrap();
                assert!(p < i, "{} before {}", parent, def.name);
            }
            if def.supervised {
                let s = IMAGES.iter().position(|d| d.name == SUPERVISOR).unwrap();
                assert!(s < i, "{SUPERVISOR} before {}", def.name);
            }
        }
    }
}
