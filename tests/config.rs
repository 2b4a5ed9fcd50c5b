//! Configuration precedence (defaults < file < env < CLI) and start-up errors, through the real binary.

use std::process::Command;

fn reranker(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reranker"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("RERANKER_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run reranker");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn effective(args: &[&str], env: &[(&str, &str)]) -> toml::Table {
    let (ok, out, err) = reranker(args, env);
    assert!(ok, "reranker config failed: {err}");
    toml::from_str(&out).expect("config prints TOML")
}

fn get<'a>(t: &'a toml::Table, path: &str) -> &'a toml::Value {
    let mut parts = path.split('.');
    let mut v = &t[parts.next().unwrap()];
    for p in parts {
        v = &v[p];
    }
    v
}

fn write(dir: &tempfile::TempDir, body: &str) -> String {
    let p = dir.path().join("reranker.toml");
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn precedence_is_defaults_file_env_cli() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "[batch]\nmax_batch_pairs = 11\nmax_wait_ms = 7\nmax_batch_tokens = 9000\n[kafka]\ngroup_id = \"from-file\"\n",
    );
    let defaults = effective(&["config"], &[]);
    assert_eq!(
        get(&defaults, "batch.max_batch_pairs").as_integer(),
        Some(32)
    );

    let t = effective(&["config", "--config", &file], &[]);
    assert_eq!(get(&t, "batch.max_batch_pairs").as_integer(), Some(11));
    assert_eq!(get(&t, "kafka.group_id").as_str(), Some("from-file"));
    assert_eq!(get(&t, "batch.max_batch_tokens").as_integer(), Some(9000));

    let env = [
        ("RERANKER_BATCH__MAX_BATCH_PAIRS", "12"),
        ("RERANKER_KAFKA__GROUP_ID", "from-env"),
    ];
    let t = effective(&["config", "--config", &file], &env);
    assert_eq!(get(&t, "batch.max_batch_pairs").as_integer(), Some(12));
    assert_eq!(get(&t, "kafka.group_id").as_str(), Some("from-env"));
    assert_eq!(
        get(&t, "batch.max_wait_ms").as_integer(),
        Some(7),
        "file value not overridden survives"
    );

    let t = effective(
        &[
            "config",
            "--config",
            &file,
            "--group-id",
            "from-cli",
            "--set",
            "batch.max_batch_pairs=13",
        ],
        &env,
    );
    assert_eq!(get(&t, "batch.max_batch_pairs").as_integer(), Some(13));
    assert_eq!(get(&t, "kafka.group_id").as_str(), Some("from-cli"));
}

#[test]
fn kafka_client_settings_pass_through_and_secrets_are_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        "[kafka.client]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.password\" = \"hunter2\"\n",
    );
    let (ok, out, err) = reranker(
        &["config", "--config", &file],
        &[("RERANKER_KAFKA__CLIENT__SASL_USERNAME", "svc")],
    );
    assert!(ok, "{err}");
    assert!(!out.contains("hunter2"), "secret printed:\n{out}");
    let t: toml::Table = toml::from_str(&out).unwrap();
    let client = get(&t, "kafka.client");
    assert_eq!(client["security.protocol"].as_str(), Some("SASL_SSL"));
    assert_eq!(client["sasl.password"].as_str(), Some("<redacted>"));
    assert_eq!(
        client["sasl.username"].as_str(),
        Some("svc"),
        "env var underscores map to dots"
    );
}

#[test]
fn errors_name_the_offending_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(String, &str)> = vec![
        ("[batch]\nmax_batch_pair = 3\n".into(), "max_batch_pair"),
        (
            "[batch]\nmax_wait_ms = \"soon\"\n".into(),
            "batch.max_wait_ms",
        ),
        ("[model]\ndevice = \"tpu\"\n".into(), "model.device"),
        ("[nope]\nx = 1\n".into(), "nope"),
        (
            "[batch]\nmax_batch_pairs = 0\n".into(),
            "batch.max_batch_pairs",
        ),
        (
            "[kafka]\noutput_topic = \"retrieval-results\"\n".into(),
            "kafka.input_topic",
        ),
        (
            "[kafka.client]\n\"enable.auto.offset.store\" = \"true\"\n".into(),
            "enable.auto.offset.store",
        ),
        ("[http]\nlisten = \"localhost\"\n".into(), "http.listen"),
        ("[http]\nlisten = \"0.0.0.0:99999\"\n".into(), "http.listen"),
        ("[http]\nport = 9464\n".into(), "port"),
        (
            "[http]\nbroker_timeout_ms = 1000\n".into(),
            "http.broker_timeout_ms",
        ),
        (
            "[kafka]\nstatistics_interval_ms = 0\n".into(),
            "kafka.statistics_interval_ms",
        ),
        (
            "[kafka.consumer]\n\"statistics.interval.ms\" = \"100\"\n".into(),
            "kafka.statistics_interval_ms",
        ),
        (
            "[otel]\nendpoint = \"otel-collector:4317\"\n".into(),
            "otel.endpoint",
        ),
        ("[otel]\nprotocol = \"grpc\"\n".into(), "otel.protocol"),
        (
            "[input]\ntext_template = \"{title\"\n".into(),
            "input.text_template",
        ),
        (
            "[input]\ntext_template = \"{metadata}\"\n".into(),
            "input.text_template",
        ),
        (
            "[input]\ntext_template = \"plain\"\n".into(),
            "input.text_template",
        ),
        (
            "[input]\nmissing_template_field = \"skip\"\n".into(),
            "input.missing_template_field",
        ),
        ("[input]\nstrict = \"yes\"\n".into(), "input.strict"),
        (
            "[inference]\nmax_retries = 11\n".into(),
            "inference.max_retries",
        ),
        (
            "[deadline]\naction = \"ignore\"\n".into(),
            "deadline.action",
        ),
        (
            "[output]\nmin_relevance = 1.5\n".into(),
            "output.min_relevance",
        ),
        (
            "[[output.labels]]\nname = \"likely\"\nmin_relevance = 0.3\n".into(),
            "output.labels",
        ),
        (
            "[[output.labels]]\nname = \"a\"\nmin_relevance = 0.0\n[[output.labels]]\nname = \"b\"\nmin_relevance = 0.0\n".into(),
            "output.labels",
        ),
        (
            "[[output.labels]]\nname = \"a\"\nmin_relevance = 0.0\n[[output.labels]]\nname = \"b\"\nmin_relevance = 1.2\n".into(),
            "output.labels",
        ),
        (
            "[[output.labels]]\nname = \"a\"\nmin_relevance = 0.0\n[[output.labels]]\nname = \"a\"\nmin_relevance = 0.5\n".into(),
            "output.labels",
        ),
        (
            "[[output.labels]]\nname = \" \"\nmin_relevance = 0.0\n".into(),
            "output.labels",
        ),
    ];
    for (body, key) in cases {
        let file = write(&dir, &body);
        let (ok, _, err) = reranker(&["config", "--config", &file], &[]);
        assert!(!ok, "accepted bad config:\n{body}");
        assert!(
            err.contains(key),
            "error for\n{body}\ndoes not name `{key}`: {err}"
        );
    }
    let (ok, _, err) = reranker(&["config", "--set", "batch.max_wait_ms"], &[]);
    assert!(!ok && err.contains("KEY=VALUE"), "{err}");
    let (ok, _, err) = reranker(&["config", "--config", "/nonexistent/reranker.toml"], &[]);
    assert!(!ok && err.contains("/nonexistent/reranker.toml"), "{err}");
    let (ok, _, err) = reranker(
        &["config"],
        &[("RERANKER_FLOW__MAX_INFLIGHT_PAIRS", "lots")],
    );
    assert!(
        !ok && err.to_lowercase().contains("flow.max_inflight_pairs"),
        "{err}"
    );
}

#[test]
fn the_shipped_config_file_is_valid() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/config/reranker.toml");
    let t = effective(&["config", "--config", file], &[]);
    assert!(get(&t, "kafka.brokers").as_str().is_some());
    assert_eq!(get(&t, "http.listen").as_str(), Some("0.0.0.0:9464"));
    assert_eq!(get(&t, "http.enabled").as_bool(), Some(true));
    assert_eq!(
        get(&t, "kafka.statistics_interval_ms").as_integer(),
        Some(5000)
    );
}

#[test]
fn input_and_output_contract_keys() {
    let defaults = effective(&["config"], &[]);
    assert_eq!(get(&defaults, "input.strict").as_bool(), Some(false));
    assert_eq!(
        get(&defaults, "input.missing_template_field").as_str(),
        Some("empty")
    );
    assert!(defaults["input"].get("text_template").is_none());
    assert!(defaults["output"].get("min_relevance").is_none());
    assert_eq!(
        get(&defaults, "output.labels").as_array().map(Vec::len),
        Some(0)
    );

    let dir = tempfile::tempdir().unwrap();
    let file = write(
        &dir,
        r#"
[input]
strict = true
text_template = "{title}\n{text} {{literal}}"
missing_template_field = "dead_letter"

[output]
min_relevance = 0.25

[[output.labels]]
name = "unlikely"
min_relevance = 0.0

[[output.labels]]
name = "likely"
min_relevance = 0.3

[[output.labels]]
name = "very likely"
min_relevance = 0.7
"#,
    );
    let t = effective(&["config", "--config", &file], &[]);
    assert_eq!(
        get(&t, "input.text_template").as_str(),
        Some("{title}\n{text} {{literal}}")
    );
    assert_eq!(
        get(&t, "input.missing_template_field").as_str(),
        Some("dead_letter")
    );
    assert_eq!(get(&t, "output.min_relevance").as_float(), Some(0.25));
    let labels = get(&t, "output.labels").as_array().unwrap();
    assert_eq!(labels.len(), 3);
    assert_eq!(labels[2]["name"].as_str(), Some("very likely"));
    // The env var and the CLI reach the template too.
    let t = effective(
        &["config", "--set", "input.text_template={title}"],
        &[("RERANKER_INPUT__STRICT", "true")],
    );
    assert_eq!(get(&t, "input.text_template").as_str(), Some("{title}"));
    assert_eq!(get(&t, "input.strict").as_bool(), Some(true));
}

#[test]
fn inference_and_deadline_keys() {
    let defaults = effective(&["config"], &[]);
    assert_eq!(
        get(&defaults, "inference.max_retries").as_integer(),
        Some(2)
    );
    assert_eq!(
        get(&defaults, "inference.oom_cooldown_ms").as_integer(),
        Some(60000)
    );
    assert_eq!(
        get(&defaults, "deadline.action").as_str(),
        Some("dead_letter")
    );
    let t = effective(
        &["config", "--set", "deadline.action=\"score_anyway\""],
        &[("RERANKER_INFERENCE__MAX_RETRIES", "0")],
    );
    assert_eq!(get(&t, "deadline.action").as_str(), Some("score_anyway"));
    assert_eq!(get(&t, "inference.max_retries").as_integer(), Some(0));
}
