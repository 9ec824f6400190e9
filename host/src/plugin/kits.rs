//! The plugin kits' templates, built into the host: `iim-host plugin new NAME --lang LANG`
//! writes one into a new directory, with the WIT package beside it, ready to build.
//!
//! A kit is `kits/LANG/` in the repository; its `template/` is what is embedded (by the
//! host's build script). In every text file, `{{name}}` becomes the plugin's name, `{{crate}}`
//! that name as a Rust crate name, and `{{sdk}}` the path of the Rust SDK.

use std::path::{Path, PathBuf};

include!(concat!(env!("OUT_DIR"), "/kits.rs"));

/// The WIT package every plugin is built against, written into each new project as
/// `wit/iim.wit`.
pub const WIT: &str = include_str!("../../../wit/iim.wit");

/// Where the Rust SDK was when this host was built: a Rust project made on the same machine
/// depends on it by path unless `--sdk` says otherwise.
const SDK_AT_BUILD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugin-sdk");

/// Why a project was not made.
#[derive(Debug, thiserror::Error)]
pub enum NewError {
    /// No kit for this language.
    #[error("no kit for {0:?}; the kits are: {1}")]
    Lang(String, String),
    /// Not a plugin name.
    #[error("{0:?} is not a plugin name: 1 to 64 bytes of a-z 0-9 . _ -")]
    Name(String),
    /// The directory is there and not empty.
    #[error("{0} exists and is not empty; choose another name or --dir")]
    Exists(PathBuf),
    /// The Rust SDK is not where it was when the host was built.
    #[error(
        "the Rust SDK (plugin-sdk of the iim repository) is not at {0}; say where it is with --sdk PATH"
    )]
    Sdk(PathBuf),
    /// Writing failed.
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

/// The languages there is a kit for.
pub fn langs() -> Vec<&'static str> {
    KITS.iter().map(|(lang, _)| *lang).collect()
}

/// Writes a new project for plugin `name` in `lang` into `dir` (which must not exist or be
/// empty), and returns the files written. `sdk` is the Rust SDK's path, for `rust`.
pub fn new_project(
    name: &str,
    lang: &str,
    dir: &Path,
    sdk: Option<&Path>,
) -> Result<Vec<PathBuf>, NewError> {
    let Some((_, files)) = KITS.iter().find(|(l, _)| *l == lang) else {
        return Err(NewError::Lang(lang.to_owned(), langs().join(", ")));
    };
    if iim_proto::UserId::new(name).is_err() {
        return Err(NewError::Name(name.to_owned()));
    }
    if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(NewError::Exists(dir.to_owned()));
    }
    let sdk = if lang == "rust" {
        let sdk = sdk.map_or_else(|| PathBuf::from(SDK_AT_BUILD), Path::to_owned);
        let sdk = std::path::absolute(&sdk).unwrap_or(sdk);
        if !sdk.join("Cargo.toml").is_file() {
            return Err(NewError::Sdk(sdk));
        }
        // Without the `..` of the build-time path.
        sdk.canonicalize().unwrap_or(sdk).display().to_string()
    } else {
        String::new()
    };
    let krate = name.replace(['.', '-'], "_");
    let mut written = Vec::new();
    let mut write = |relative: &str, bytes: &[u8]| -> Result<(), NewError> {
        let path = dir.join(relative);
        let failed = |e| NewError::Write(path.clone(), e);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(failed)?;
        }
        std::fs::write(&path, bytes).map_err(failed)?;
        #[cfg(unix)]
        if relative.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .map_err(failed)?;
        }
        written.push(path);
        Ok(())
    };
    for (relative, bytes) in *files {
        match std::str::from_utf8(bytes) {
            Ok(text) => {
                let text = text
                    .replace("{{name}}", name)
                    .replace("{{crate}}", &krate)
                    .replace("{{sdk}}", &sdk);
                write(relative, text.as_bytes())?;
            }
            // A binary file (pre-generated bindings' object file) is written as it is.
            Err(_) => write(relative, bytes)?,
        }
    }
    write("wit/iim.wit", WIT.as_bytes())?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kit_has_a_build_script_and_the_rust_one_names_the_plugin() {
        assert!(langs().contains(&"rust"), "{:?}", langs());
        for (lang, files) in KITS {
            assert!(
                files.iter().any(|(path, _)| *path == "build.sh"),
                "kit {lang} has no build.sh"
            );
        }
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("echo.v2");
        let written = new_project("echo.v2", "rust", &dir, None).expect("written");
        assert!(written.contains(&dir.join("wit/iim.wit")));
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("manifest");
        assert!(manifest.contains("name = \"echo_v2\""), "{manifest}");
        assert!(!manifest.contains("{{"), "{manifest}");
        let lib = std::fs::read_to_string(dir.join("src/lib.rs")).expect("lib");
        assert!(lib.contains("\"echo.v2\""));

        // Not twice into the same directory, not an invalid name, not an unknown language.
        assert!(matches!(
            new_project("echo.v2", "rust", &dir, None),
            Err(NewError::Exists(_))
        ));
        assert!(matches!(
            new_project("Echo", "rust", &root.path().join("x"), None),
            Err(NewError::Name(_))
        ));
        let unknown = new_project("echo", "cobol", &root.path().join("y"), None);
        assert!(
            matches!(&unknown, Err(NewError::Lang(_, kits)) if kits.contains("rust")),
            "{unknown:?}"
        );
    }
}
