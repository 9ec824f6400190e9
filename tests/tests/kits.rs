//! End-to-end: the plugin kits (`kits/LANG`). Each kit's example, the same `typing` plugin in
//! every language, is built with the kit's own build script and then, as its author would:
//! checked (`iim-host plugin check`), tested without a host (`iim-host plugin test` with
//! `kits/typing.test.toml`), installed into a running host (`iim-host plugin install`), used by
//! two clients, refused a body it rejects, and replaced under load with nothing lost, repeated
//! or reordered. Also: `plugin new` writes a project per kit, and `plugin check` refuses what a
//! host could not load, with clear messages.

use anyhow::{Context as _, ensure};
use iim_client::proto::MessageKind;
use iim_e2e::*;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

type Result = anyhow::Result<()>;

/// Runs `iim-host ARGS`, with `dir` as the host's data directory when given.
fn iim_host(args: &[&str], data_dir: Option<&Path>) -> anyhow::Result<Output> {
    let mut command = std::process::Command::new(binary("iim-host")?);
    if let Some(dir) = data_dir {
        // The test hosts' compiled-code cache: an install compiles for the host it installs to.
        command.arg("--data-dir").arg(dir);
        command.arg("--plugin-cache-dir").arg(plugin_cache());
    }
    // A cache of the test's own for checks and tests, not the user's.
    command.env(
        "XDG_CACHE_HOME",
        workspace().join("target/plugins-wasm/cache-cli"),
    );
    let output = command.args(args).output().context("cannot run iim-host")?;
    Ok(output)
}

/// [`iim_host`] off the async threads: a test's clients stay connected while it compiles.
async fn iim_host_async(args: &[&str], data_dir: Option<&Path>) -> anyhow::Result<Output> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let data_dir = data_dir.map(Path::to_path_buf);
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        iim_host(&args, data_dir.as_deref())
    })
    .await?
}

fn said(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `bytes` with a custom section appended: another build of the same component.
fn rebuilt(bytes: &[u8], generation: u8) -> Vec<u8> {
    let name = b"iim-kit-generation";
    let mut out = bytes.to_vec();
    out.extend([0, (1 + name.len() + 1) as u8, name.len() as u8]);
    out.extend_from_slice(name);
    out.push(generation);
    out
}

/// The whole path of a kit's example, from build to hot replacement under load.
async fn example_end_to_end(lang: &str) -> Result {
    let Some(wasm) = kit_example(lang)? else {
        return Ok(());
    };
    let wasm_arg = wasm.to_str().context("path")?;

    // Checked, then tested against a host of its own, as an author would before installing.
    let check = iim_host_async(&["plugin", "check", wasm_arg], None).await?;
    ensure!(
        check.status.success(),
        "{lang}: check failed:\n{}",
        said(&check)
    );
    ensure!(
        said(&check).contains("init: typing 0.1.0, handles message(typing)"),
        "{lang}: {}",
        said(&check)
    );
    let script = workspace().join("kits/typing.test.toml");
    let test = iim_host_async(
        &["plugin", "test", wasm_arg, script.to_str().context("path")?],
        None,
    )
    .await?;
    ensure!(
        test.status.success(),
        "{lang}: plugin test failed:\n{}",
        said(&test)
    );

    // Installed into a running host, with two instances and a kind of its own configured.
    let host = HostProcess::start_chat_only()?;
    let alice = host.register("alice").await?;
    let bob = host.register("bob").await?;
    let (a, _) = host.online(&alice, "phone").await?;
    let (b, _) = host.online(&bob, "phone").await?;
    let config = host.data_dir().join("typing-config.toml");
    std::fs::write(&config, "kind = \"typing2\"\n[host]\ninstances = 2\n")?;
    let install = iim_host_async(
        &[
            "plugin",
            "install",
            wasm_arg,
            "--config",
            config.to_str().context("path")?,
        ],
        Some(host.data_dir()),
    )
    .await?;
    ensure!(
        install.status.success(),
        "{lang}: install failed:\n{}",
        said(&install)
    );
    ensure!(
        said(&install).contains("the running host loaded it: typing\t"),
        "{lang}: {}",
        said(&install)
    );
    let listed = host.admin("plugins").await?;
    ensure!(
        listed.contains("message(typing2)") && listed.contains("instances 2,"),
        "{lang}: {listed}"
    );

    let kind = MessageKind::Custom("typing2".into());
    let send = |body: &'static [u8]| {
        a.submit(
            iim_client::new_client_id(),
            kind.clone(),
            std::slice::from_ref(&bob),
            body,
        )
    };
    let accepted = send(b"started").await?;
    let got = within("the indicator", next_message(&b)).await??;
    ensure!(
        (got.id, &got.from, text(&got).as_str(), &got.kind)
            == (accepted.id, &alice, "started", &kind),
        "{lang}: {got:?}"
    );
    // Over the default max_body (64 bytes): refused by the plugin; Bob gets nothing.
    send(&[b'x'; 65]).await?;
    if let Ok(event) = tokio::time::timeout(Duration::from_millis(500), b.next_event()).await {
        anyhow::bail!("{lang}: a 65-byte body reached bob: {event:?}");
    }
    within("the refusal in the log", async {
        while !host
            .log()
            .contains("typing body is 65 bytes, more than the 64 allowed")
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await?;

    // Replaced twice while Alice sends: every indicator once, in order.
    let original = std::fs::read(&wasm)?;
    let target = host.plugins_dir().join("typing.wasm");
    under_load((a, b, bob.clone()), kind, async {
        for generation in 1..=2 {
            let tmp = host.plugins_dir().join(".typing.next");
            std::fs::write(&tmp, rebuilt(&original, generation))?;
            std::fs::rename(&tmp, &target)?;
            host.admin("reload").await?;
        }
        anyhow::Ok(())
    })
    .await??;
    ensure!(
        host.log().matches("plugin replaced").count() == 2,
        "{lang}: {}",
        host.log()
    );
    Ok(())
}

#[tokio::test]
async fn the_rust_example_goes_from_build_to_hot_replacement() -> Result {
    example_end_to_end("rust").await
}

#[tokio::test]
async fn the_python_example_goes_from_build_to_hot_replacement() -> Result {
    example_end_to_end("python").await
}

#[tokio::test]
async fn the_javascript_example_goes_from_build_to_hot_replacement() -> Result {
    example_end_to_end("js").await
}

#[tokio::test]
async fn the_typescript_example_goes_from_build_to_hot_replacement() -> Result {
    example_end_to_end("ts").await
}

#[tokio::test]
async fn the_c_example_goes_from_build_to_hot_replacement() -> Result {
    example_end_to_end("c").await
}

#[tokio::test]
async fn the_zig_example_goes_from_build_to_hot_replacement() -> Result {
    example_end_to_end("zig").await
}

/// A project from `plugin new` whose `handle` throws on a 4-byte body, built with the kit's
/// tools: `plugin test` finds the outcome `failed` with the exception's message (the kit's
/// wrapper; a host retries such an event, then keeps it as a dead letter with that reason),
/// not a trap.
async fn an_uncaught_exception_is_failed_not_a_trap(
    lang: &str,
    file: &str,
    from: &str,
    to: &str,
) -> Result {
    // The kit's tools, installed by its example's build.
    if kit_example(lang)?.is_none() {
        return Ok(());
    }
    let root = tempfile::tempdir()?;
    let dir = root.path().join("boom");
    let dir_arg = dir.to_str().context("path")?.to_owned();
    let new = iim_host_async(
        &["plugin", "new", "boom", "--lang", lang, "--dir", &dir_arg],
        None,
    )
    .await?;
    ensure!(new.status.success(), "{}", said(&new));
    let source = std::fs::read_to_string(dir.join(file))?;
    ensure!(
        source.contains(from),
        "{lang}: the template changed: {source}"
    );
    std::fs::write(dir.join(file), source.replacen(from, to, 1))?;
    let tools = workspace().join("target/kits").join(lang);
    let build = tokio::process::Command::new("bash")
        .arg(dir.join("build.sh"))
        .env("IIM_KIT_TOOLS", &tools)
        .current_dir(&dir)
        .output()
        .await?;
    ensure!(build.status.success(), "{lang}: {}", said(&build));
    let script = dir.join("boom.test.toml");
    std::fs::write(
        &script,
        "users = [\"alice\", \"bob\"]\n\n\
         [[event]]\n\
         message = { from = \"alice\", to = [\"bob\"], kind = \"boom\", body = \"four\" }\n\
         failed = \"boom: four bytes\"\n\n\
         [[event]]\n\
         message = { from = \"alice\", to = [\"bob\"], kind = \"boom\", body = \"hi\" }\n\
         sends = [{ to = [\"bob\"], forward = true }]\n",
    )?;
    let wasm = dir.join("boom.wasm");
    let test = iim_host_async(
        &[
            "plugin",
            "test",
            wasm.to_str().context("path")?,
            script.to_str().context("path")?,
        ],
        None,
    )
    .await?;
    ensure!(test.status.success(), "{lang}: {}", said(&test));
    Ok(())
}

#[tokio::test]
async fn a_javascript_exception_is_failed_not_a_trap() -> Result {
    an_uncaught_exception_is_failed_not_a_trap(
        "js",
        "app.js",
        "  handle(event) {\n",
        "  handle(event) {\n    if (event.tag === 'message' && event.val.body.length === 4) throw new Error('boom: four bytes');\n",
    )
    .await
}

#[tokio::test]
async fn a_python_exception_is_failed_not_a_trap() -> Result {
    an_uncaught_exception_is_failed_not_a_trap(
        "python",
        "app.py",
        "        msg = event.value\n",
        "        msg = event.value\n        if len(msg.body) == 4:\n            raise ValueError(\"boom: four bytes\")\n",
    )
    .await
}

/// `plugin install` of a build the check accepts but the running host refuses (here: more memory
/// than the host allows, which the CLI, run without the host's configuration, did not know): the
/// files that were there come back, the serving build stays, the command says so.
#[tokio::test]
async fn an_install_the_host_refuses_puts_the_previous_files_back() -> Result {
    let Some(wasm) = kit_example("rust")? else {
        return Ok(());
    };
    let chat = default_plugin("chat")?;
    let host = HostProcess::start_with(
        "[plugins]\nmax_memory_mib = 64\n",
        Plugins::Only(&[("chat", &chat)]),
    )?;
    let wasm_arg = wasm.to_str().context("path")?;
    let first = iim_host_async(&["plugin", "install", wasm_arg], Some(host.data_dir())).await?;
    ensure!(first.status.success(), "{}", said(&first));
    let installed = std::fs::read(host.plugins_dir().join("typing.wasm"))?;
    let serving = host.admin("plugins").await?;

    let other = host.data_dir().join("other.wasm");
    std::fs::write(&other, rebuilt(&installed, 9))?;
    let config = host.data_dir().join("big.toml");
    std::fs::write(&config, "[host]\nmax_memory_mib = 100\n")?;
    let refused = iim_host_async(
        &[
            "plugin",
            "install",
            other.to_str().context("path")?,
            "--config",
            config.to_str().context("path")?,
        ],
        Some(host.data_dir()),
    )
    .await?;
    ensure!(refused.status.code() == Some(1), "{}", said(&refused));
    ensure!(
        said(&refused).contains("host.max_memory_mib must be a whole number from 1 to 64")
            && said(&refused).contains("the files that were there before are back"),
        "{}",
        said(&refused)
    );
    ensure!(std::fs::read(host.plugins_dir().join("typing.wasm"))? == installed);
    ensure!(
        !host.plugins_dir().join("typing.toml").exists(),
        "the new configuration stayed"
    );
    let after = host.admin("plugins").await?;
    let typing = |listing: &str| {
        listing
            .lines()
            .find(|l| l.starts_with("typing\t"))
            .map(str::to_owned)
    };
    ensure!(typing(&after) == typing(&serving), "{serving}\n{after}");
    ensure!(!after.contains("refused"), "{after}");
    Ok(())
}

/// The C kit's bindings (which the Zig kit shares) are generated from the WIT and committed, so
/// that a C author needs no cargo: they must be those of the WIT the host is built against.
#[test]
fn the_committed_c_bindings_are_those_of_the_wit() -> Result {
    use sha2::Digest as _;
    let wit = std::fs::read(workspace().join("wit/iim.wit"))?;
    let digest: String = sha2::Sha256::digest(&wit)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let recorded = std::fs::read_to_string(workspace().join("kits/c/bindings.wit-sha256"))?;
    ensure!(
        recorded.trim() == digest,
        "wit/iim.wit changed since the C bindings were generated: run \
         bash kits/c/regenerate-bindings.sh and commit what it writes"
    );
    Ok(())
}

#[test]
fn plugin_new_writes_a_project_for_every_kit() -> Result {
    let root = tempfile::tempdir()?;
    let mut langs = Vec::new();
    for entry in std::fs::read_dir(workspace().join("kits"))? {
        let path = entry?.path();
        if path.join("template").is_dir() {
            langs.push(
                path.file_name()
                    .context("name")?
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    ensure!(langs.iter().any(|l| l == "rust"), "{langs:?}");
    for lang in &langs {
        let lang = lang.as_str();
        let dir = root.path().join(lang);
        let new = iim_host(
            &[
                "plugin",
                "new",
                "echo",
                "--lang",
                lang,
                "--dir",
                dir.to_str().context("path")?,
            ],
            None,
        )?;
        ensure!(new.status.success(), "{lang}: {}", said(&new));
        ensure!(dir.join("build.sh").is_file(), "{lang}: no build.sh");
        ensure!(dir.join("wit/iim.wit").is_file(), "{lang}: no WIT");
        let again = iim_host(
            &[
                "plugin",
                "new",
                "echo",
                "--lang",
                lang,
                "--dir",
                dir.to_str().context("path")?,
            ],
            None,
        )?;
        ensure!(
            !again.status.success() && said(&again).contains("is not empty"),
            "{lang}: written twice: {}",
            said(&again)
        );
    }
    let unknown = iim_host(&["plugin", "new", "echo", "--lang", "cobol"], None)?;
    ensure!(
        !unknown.status.success() && said(&unknown).contains("no kit for \"cobol\""),
        "{}",
        said(&unknown)
    );
    Ok(())
}

#[test]
fn plugin_check_refuses_what_a_host_could_not_load_saying_why() -> Result {
    let root = tempfile::tempdir()?;
    let cases = [
        (
            "http",
            wat::parse_str(
                r#"(component
                    (import "wasi:http/outgoing-handler@0.2.3" (instance
                        (export "handle" (func (param "x" u32)))))
                )"#,
            )?,
            vec![
                "it imports what this host does not provide",
                "wasi:http/outgoing-handler@0.2.3",
                "--disable http",
            ],
        ),
        (
            "other-world",
            wat::parse_str(
                r#"(component
                    (import "iim:plugin/iim@0.2.0" (instance
                        (export "log" (func (param "m" string)))))
                )"#,
            )?,
            vec![
                "another version of the iim:plugin WIT",
                "does not export iim:plugin/handler",
            ],
        ),
        (
            "core",
            wat::parse_str("(module (func (export \"handle\")))")?,
            vec!["a core WebAssembly module, not a component"],
        ),
    ];
    for (name, bytes, expected) in cases {
        let path = root.path().join(format!("{name}.wasm"));
        std::fs::write(&path, bytes)?;
        let check = iim_host(&["plugin", "check", path.to_str().context("path")?], None)?;
        ensure!(check.status.code() == Some(1), "{name}: {}", said(&check));
        for part in expected {
            ensure!(
                said(&check).contains(part),
                "{name}: no {part:?} in {}",
                said(&check)
            );
        }
        // And install refuses it too, writing nothing.
        let data = root.path().join(format!("data-{name}"));
        let install = iim_host(
            &["plugin", "install", path.to_str().context("path")?],
            Some(&data),
        )?;
        ensure!(
            !install.status.success(),
            "{name}: installed: {}",
            said(&install)
        );
        ensure!(!data.join("plugins").join(format!("{name}.wasm")).exists());
    }
    Ok(())
}
