//! The file `device import --sync` and `service import --sync` reconcile the registry
//! to: the import file's `[[principal]]` entries, plus `enabled` and the `*_generate`
//! keys. Read with each entry's line, so that every error names its place in the file
//! (never its text: a mistyped secret stays out of the terminal). And the plan, as the
//! operator reads it.

use crate::admin::protocol::{SyncEntry, SyncPlan, SyncPrincipals};
use crate::usage::UsageError;
use anyhow::Result;
use portcullis_core::principal::PrincipalKind;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncFile {
    #[serde(default)]
    principal: Vec<toml::Spanned<SyncFileEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncFileEntry {
    id: String,
    #[serde(default)]
    group: Option<String>,
    /// PEM file to pin, relative to the file.
    #[serde(default)]
    cert: Option<PathBuf>,
    #[serde(default)]
    cert_any: bool,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    psk: Option<String>,
    #[serde(default)]
    serial_key: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    generate_secret: bool,
    #[serde(default)]
    psk_generate: bool,
    #[serde(default)]
    serial_key_generate: bool,
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> u64 {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count() as u64
        + 1
}

/// A parser's message without the value it found: serde's "invalid type: string
/// \"…\", expected a boolean" quotes what the file holds there, which may be a secret
/// put under the wrong key.
fn redact(message: &str) -> String {
    for kind in ["invalid type", "invalid value", "invalid length"] {
        if let Some(rest) = message.strip_prefix(kind) {
            return match rest.rfind(", expected ") {
                Some(at) => format!("{kind} (the value is not shown){}", &rest[at..]),
                None => format!("{kind} (the value is not shown)"),
            };
        }
    }
    message.to_string()
}

/// The file's entries, and the problems found reading them here (a certificate file
/// that cannot be read), each `line N: entry I: …`. A file that does not parse is an
/// error at once, naming the line.
pub fn read(file: &Path) -> Result<(Vec<SyncEntry>, Vec<String>)> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| UsageError(format!("{}: {e}", file.display())))?;
    let parsed: SyncFile = toml::from_str(&text).map_err(|e| {
        let at = e
            .span()
            .map(|s| format!("line {}: ", line_of(&text, s.start)))
            .unwrap_or_default();
        UsageError(format!(
            "{}: {at}{}",
            file.display(),
            redact(e.message().trim())
        ))
    })?;
    let base = file.parent().unwrap_or(Path::new("."));
    let mut entries = Vec::with_capacity(parsed.principal.len());
    let mut problems = Vec::new();
    for (i, spanned) in parsed.principal.into_iter().enumerate() {
        let line = line_of(&text, spanned.span().start);
        let e = spanned.into_inner();
        let cert_fingerprint = match &e.cert {
            Some(c) => match crate::pki::fingerprint_pem_file(&base.join(c)) {
                Ok(fp) => Some(fp),
                Err(err) => {
                    problems.push(format!(
                        "line {line}: entry {} ({:?}): cert: {err:#}",
                        i + 1,
                        e.id
                    ));
                    continue;
                }
            },
            None => None,
        };
        entries.push(SyncEntry {
            principal: crate::admin::protocol::NewPrincipal {
                id: e.id,
                group: e.group,
                cert_fingerprint,
                cert_any: e.cert_any,
                secret: e.secret,
                psk: e.psk,
                serial_key: e.serial_key,
            },
            enabled: e.enabled,
            generate_secret: e.generate_secret,
            psk_generate: e.psk_generate,
            serial_key_generate: e.serial_key_generate,
            line: Some(line),
        });
    }
    Ok((entries, problems))
}

/// `line N: …` problems, in the order of the file.
fn by_line(mut problems: Vec<String>) -> Vec<String> {
    let line = |p: &String| -> u64 {
        p.strip_prefix("line ")
            .and_then(|r| r.split(':').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(u64::MAX)
    };
    problems.sort_by_key(line);
    problems
}

/// The refusal of a file with errors: every one of them, nothing changed.
pub fn refused(file: &Path, problems: Vec<String>) -> anyhow::Error {
    UsageError(format!(
        "{}: {} error(s), nothing changed:\n  {}",
        file.display(),
        problems.len(),
        by_line(problems).join("\n  ")
    ))
    .into()
}

/// The errors the gateway named in a refused sync (`  line …` lines), if it was one.
pub fn gateway_problems(e: &anyhow::Error) -> Option<Vec<String>> {
    let m = e.downcast_ref::<UsageError>()?;
    let (head, rest) = m.0.split_once('\n')?;
    head.ends_with("error(s), nothing changed:").then(|| {
        rest.lines()
            .map(|l| l.trim_start().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    })
}

/// A sync request for these entries.
pub fn request(kind: PrincipalKind, entries: Vec<SyncEntry>, dry_run: bool) -> SyncPrincipals {
    SyncPrincipals {
        kind,
        entries,
        dry_run,
    }
}

/// The plan, then what was done: stable (each part sorted by id), no secret's value
/// except the generated ones, shown once at the end.
pub fn print_plan(kind: PrincipalKind, file: &Path, plan: &SyncPlan, dry_run: bool) {
    let (add, update, remove) = (plan.add.len(), plan.update.len(), plan.remove.len());
    if add + update + remove == 0 {
        println!(
            "{kind} sync from {}: nothing to do ({} unchanged)",
            file.display(),
            plan.unchanged
        );
        return;
    }
    println!(
        "{kind} sync from {}: {add} to add, {update} to update, {remove} to remove, {} unchanged",
        file.display(),
        plan.unchanged
    );
    for a in &plan.add {
        let disabled = if a.enabled { "" } else { ", disabled" };
        println!(
            "+ {}  group {}{disabled}; {}",
            a.id,
            a.group,
            a.credentials.join(", ")
        );
    }
    for u in &plan.update {
        let kept = if u.kept.is_empty() {
            String::new()
        } else {
            format!("; kept (not in the file): {}", u.kept.join(", "))
        };
        println!("~ {}  {}{kept}", u.id, u.changes.join("; "));
    }
    for id in &plan.remove {
        println!("- {id}");
    }
    if dry_run {
        println!("dry run: nothing changed");
        return;
    }
    println!(
        "applied in one commit: {add} added, {update} updated, {remove} removed; {} session(s) ended",
        plan.sessions_ended
    );
    for g in &plan.generated {
        println!("{} {}: {}", g.id, g.credential, g.value);
    }
    if !plan.generated.is_empty() {
        eprintln!(
            "portcullis: the generated credentials above are not shown again; hand them to \
             their devices (flash a serial key into its device)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_of_the_wrong_type_is_named_by_its_line_not_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("devices.toml");
        for (text, value) in [
            // A secret put under the flag that asks for one.
            (
                "[[principal]]\nid = \"a-1\"\ngenerate_secret = \"s3cr3t-value-0123456789\"\n",
                "s3cr3t-value-0123456789",
            ),
            (
                "[[principal]]\nid = \"a-1\"\nsecret = 98765432109876543\n",
                "98765432109876543",
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let err = read(&file).unwrap_err().to_string();
            assert!(!err.contains(value), "{err}");
            assert!(
                err.contains("line 3: invalid type (the value is not shown), expected"),
                "{err}"
            );
        }
    }

    #[test]
    fn entries_carry_their_line_and_a_syntax_error_names_its_line_not_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("devices.toml");
        std::fs::write(
            &file,
            "# devices\n\n[[principal]]\nid = \"a-1\"\ncert_any = true\n\n[[principal]]\nid = \"b-1\"\nenabled = false\n",
        )
        .unwrap();
        let (entries, problems) = read(&file).unwrap();
        assert!(problems.is_empty());
        let lines: Vec<_> = entries.iter().map(|e| e.line).collect();
        assert!(matches!(lines[..], [Some(3..=4), Some(7..=8)]), "{lines:?}");
        assert_eq!(entries[1].enabled, Some(false));
        std::fs::write(
            &file,
            "[[principal]]\nid = \"a-1\"\nsecret = \"hunter2-hunter2-hunter2\"\nsecrte = \"oops-typed-secret\"\n",
        )
        .unwrap();
        let err = read(&file).unwrap_err().to_string();
        assert!(err.contains("line 4") && err.contains("secrte"), "{err}");
        assert!(
            !err.contains("oops-typed-secret") && !err.contains("hunter2"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_certificate_file_is_named_with_its_entry_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("devices.toml");
        std::fs::write(
            &file,
            "[[principal]]\nid = \"a-1\"\ncert_any = true\n[[principal]]\nid = \"b-1\"\ncert = \"nowhere.pem\"\n",
        )
        .unwrap();
        let (entries, problems) = read(&file).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("line ") && problems[0].contains("entry 2 (\"b-1\"): cert:"),
            "{problems:?}"
        );
    }
}
