//! The command against a real S3-compatible server over HTTP: moto's server,
//! started per test by `s3server.py` (which `tools/test-all.sh` installs), whose
//! request log shows what was fetched. Round trips, range-read counts, partial
//! loads, interrupted and failed uploads, and every remote error code. Then Azure
//! Blob Storage, through Azurite (`azserver.py`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

mod common;
use common::{code_of, noise, TPDE};

/// A moto S3 server on 127.0.0.1 with a bucket `tpde`, for one test.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let log = dir.path().join("requests.jsonl");
        let (child, port) = start_server("s3server.py (is moto installed? pip install 'moto[server]')", &[&log]);
        Self { child, port, log, dir }
    }

    fn url(&self, key: &str) -> String {
        format!("s3://tpde/{key}")
    }

    /// The environment of a command that reaches this server with valid credentials.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    fn command(&self, args: &[&str], env: &[(&'static str, String)]) -> Command {
        let mut command = Command::new(TPDE);
        command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (key, _) in std::env::vars() {
            if key.starts_with("AWS_") || key.starts_with("TPDE_") {
                command.env_remove(key);
            }
        }
        command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        command
    }

    fn run_with(&self, args: &[&str], env: &[(&'static str, String)]) -> Output {
        let child = self.command(args, env).spawn().expect("tpde runs");
        wait_for(child)
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &self.env())
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(out.status.success(), "tpde {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    /// Puts a local file at a new `key` with an unsigned PUT (moto does not check
    /// signatures, but refuses an anonymous overwrite), outside the code under test.
    fn put(&self, key: &str, file: &Path) {
        let body = std::fs::read(file).expect("the file");
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        write!(
            stream,
            "PUT /tpde/{key} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        )
        .expect("send");
        stream.write_all(&body).expect("send");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).expect("reply");
        assert!(reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"), "{reply}");
    }

    /// Opens a delta through the library in this process, whose store reads its
    /// configuration from the environment: set under a lock, as tests run in
    /// parallel against servers of their own.
    fn open_delta(&self, key: &str) -> tpde::Result<tpde::DeltaFile> {
        static ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _env = ENV.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (k, v) in self.env() {
            std::env::set_var(k, v);
        }
        tpde_store::open_delta(&self.url(key))
    }

    /// The requests logged so far.
    fn requests(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
    }

    fn clear_log(&self) {
        std::fs::write(&self.log, "").expect("clear the log");
    }

    /// GET requests for `key`, and the body bytes they received.
    fn gets(&self, key: &str) -> (usize, u64) {
        let path = format!("/tpde/{key}");
        let gets: Vec<_> =
            self.requests().into_iter().filter(|r| r["method"] == "GET" && r["path"] == path.as_str()).collect();
        (gets.len(), gets.iter().map(|r| r["bytes"].as_u64().unwrap_or(0)).sum())
    }

    /// An unsigned GET to the server (moto does not check signatures): status, body.
    fn raw_get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n", self.port)
            .expect("send");
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).expect("reply");
        let reply = String::from_utf8_lossy(&reply).into_owned();
        let status = reply.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, reply)
    }

    fn exists(&self, key: &str) -> bool {
        match self.raw_get(&format!("/tpde/{key}")).0 {
            200 => true,
            404 => false,
            other => panic!("GET {key}: status {other}"),
        }
    }

    /// Multipart uploads that were started and neither completed nor aborted.
    fn open_uploads(&self) -> usize {
        let (status, body) = self.raw_get("/tpde?uploads");
        assert_eq!(status, 200, "{body}");
        body.matches("<UploadId>").count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tests/SCRIPT ARGS` (named by the first word of `script`, the rest
/// shown if it fails), a server that prints its port and serves until its stdin
/// closes.
fn start_server(script: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> (Child, u16) {
    let name = script.split_whitespace().next().expect("a script name");
    let mut child = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(name))
        .args(args.iter().map(|a| a.as_ref()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("the port");
    let port = line.trim().parse().unwrap_or_else(|_| panic!("{script} did not start: {line:?}"));
    (child, port)
}

/// Waits for a run; one that has not ended after two minutes fails the test.
fn wait_for(mut child: Child) -> Output {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().expect("kill");
    panic!("tpde hung");
}

fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            ((*name).to_owned(), TensorView::new(Dtype::BF16, shape.clone(), bytes).expect("valid view"))
        })
        .collect();
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(views, Some(metadata), path).expect("write safetensors");
}

/// A base and a fine-tune of it: four BF16 tensors of 64 Ki elements (several
/// chunks each at 16 Ki words), every 7th element changed.
fn pair(dir: &Path) -> (PathBuf, PathBuf) {
    let names = ["layers.0.q", "layers.0.k", "layers.1.q", "layers.1.k"];
    let base: Vec<(&str, Vec<usize>, Vec<u8>)> =
        names.iter().enumerate().map(|(i, n)| (*n, vec![256, 256], noise(2 << 16, i as u64 + 1))).collect();
    let target: Vec<_> = base
        .iter()
        .map(|(n, shape, bytes)| {
            let mut changed = bytes.clone();
            for i in (0..changed.len()).step_by(14) {
                changed[i] ^= 0x5a;
            }
            (*n, shape.clone(), changed)
        })
        .collect();
    let (b, t) = (dir.join("base.safetensors"), dir.join("target.safetensors"));
    write_safetensors(&b, &base);
    write_safetensors(&t, &target);
    (b, t)
}

fn s(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// Metadata (everything but chunks) and chunk bytes of a local delta.
fn split_sizes(delta: &Path) -> (u64, u64) {
    let file = tpde::DeltaFile::open(delta).expect("the delta opens");
    let chunks: u64 = (0..file.preamble().chunk_count).map(|i| u64::from(file.chunk(i).stored_len)).sum();
    (file.file_len() - chunks, chunks)
}

#[test]
fn encode_apply_verify_inspect_round_trip_through_the_store() {
    let server = Server::start();
    let dir = server.dir.path();
    let (base, target) = pair(dir);
    server.put("ckpt/base.safetensors", &base);
    server.put("ckpt/target.safetensors", &target);
    let (b, t, d, o) = (
        server.url("ckpt/base.safetensors"),
        server.url("ckpt/target.safetensors"),
        server.url("ckpt/ft.tpde"),
        server.url("ckpt/rebuilt.safetensors"),
    );
    server.ok(&["encode", &b, &t, "-o", &d, "--chunk-words", "16384"]);
    server.ok(&["apply", &b, &d, "-o", &o]);
    server.ok(&["verify", &b, &d, "--target", &o]);
    let local = dir.join("rebuilt.safetensors");
    server.ok(&["apply", s(&base), &d, "-o", s(&local)]);
    assert_eq!(std::fs::read(&local).expect("rebuilt"), std::fs::read(&target).expect("target"));
    let out = server.ok(&["inspect", &d, "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["checked"]["chunk_checksums"], false);
    let out = server.ok(&["inspect", &d, "--json", "--check-chunks"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["checked"]["chunk_checksums"], true);
    // An existing object is not replaced without --force.
    assert_eq!(code_of(&server.run(&["encode", &b, &t, "-o", &d])), "E_OUTPUT_EXISTS");
    server.ok(&["encode", &b, &t, "-o", &d, "--force", "--chunk-words", "16384"]);
}

#[test]
fn inspect_fetches_only_the_metadata_and_apply_each_byte_once() {
    let server = Server::start();
    let dir = server.dir.path();
    let (base, target) = pair(dir);
    let delta = dir.join("ft.tpde");
    common::ok(&["encode", s(&base), s(&target), "-o", s(&delta), "--chunk-words", "16384"]);
    let (metadata, chunks) = split_sizes(&delta);
    let chunk_count = tpde::DeltaFile::open(&delta).expect("opens").preamble().chunk_count;
    assert!(chunk_count >= 16, "{chunk_count} chunks");
    server.put("ft.tpde", &delta);
    let url = server.url("ft.tpde");

    server.clear_log();
    server.ok(&["inspect", &url]);
    let heads = server.requests().iter().filter(|r| r["method"] == "HEAD").count();
    assert_eq!(heads, 1);
    // The preamble, then everything after the chunks: the metadata, exactly.
    assert_eq!(server.gets("ft.tpde"), (2, metadata));

    server.clear_log();
    let out = dir.join("out.safetensors");
    server.ok(&["apply", s(&base), &url, "-o", s(&out)]);
    let (requests, bytes) = server.gets("ft.tpde");
    assert_eq!(bytes, metadata + chunks, "each byte fetched once");
    // Adjacent chunks share requests.
    assert!(requests < 2 + usize::try_from(chunk_count).expect("small") / 2, "{requests} requests");
    assert!(server.requests().iter().all(|r| r["method"] != "GET" || r["range"].is_string()), "only ranged GETs");
}

#[test]
fn a_partial_load_fetches_only_its_tensors_chunks() {
    let server = Server::start();
    let dir = server.dir.path();
    let (base, target) = pair(dir);
    let delta = dir.join("ft.tpde");
    common::ok(&["encode", s(&base), s(&target), "-o", s(&delta), "--chunk-words", "16384"]);
    server.put("ft.tpde", &delta);
    let file = tpde::DeltaFile::open(&delta).expect("opens");
    let selected: u64 = file
        .header()
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("layers.0."))
        .flat_map(|t| t.chunk_range())
        .map(|i| u64::from(file.chunk(i).stored_len))
        .sum();
    let (metadata, chunks) = split_sizes(&delta);
    assert!(selected * 3 < chunks * 2, "a real subset");
    server.clear_log();
    let out = dir.join("layer0.safetensors");
    server.ok(&["apply", s(&base), &server.url("ft.tpde"), "-o", s(&out), "--tensors", "layers.0.*"]);
    assert_eq!(server.gets("ft.tpde").1, metadata + selected);
}

#[test]
fn a_missing_object_denied_access_and_missing_credentials_have_their_codes() {
    let server = Server::start();
    let dir = server.dir.path();
    let (base, _) = pair(dir);
    let out = dir.join("out.safetensors");
    let missing = server.url("no-such.tpde");
    assert_eq!(code_of(&server.run(&["inspect", &missing])), "E_REMOTE_NOT_FOUND");
    assert_eq!(code_of(&server.run(&["apply", s(&base), &missing, "-o", s(&out)])), "E_REMOTE_NOT_FOUND");
    assert_eq!(code_of(&server.run(&["inspect", "s3://no-such-bucket/x.tpde"])), "E_REMOTE_NOT_FOUND");
    assert!(!out.exists());

    server.put("b.safetensors", &base);
    let mut env = server.env();
    env.retain(|(k, _)| *k != "AWS_ACCESS_KEY_ID");
    env.push(("AWS_ACCESS_KEY_ID", "denied".into()));
    let url = server.url("b.safetensors");
    assert_eq!(code_of(&server.run_with(&["encode", &url, "-o", s(&dir.join("x.tpde"))], &env)), "E_REMOTE_DENIED");

    // No credentials anywhere: the chain ends at an instance metadata service,
    // here one that refuses connections.
    let mut env = server.env();
    env.retain(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET"));
    env.push(("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9".into()));
    env.push(("TPDE_REMOTE_RETRIES", "0".into()));
    let out = server.run_with(&["inspect", &url], &env);
    assert_eq!(code_of(&out), "E_REMOTE_CREDENTIALS", "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_unreachable_store_gives_up_after_its_retries() {
    let server = Server::start();
    let mut env = server.env();
    env.retain(|(k, _)| *k != "AWS_ENDPOINT_URL");
    env.push(("AWS_ENDPOINT_URL", "http://127.0.0.1:9".into()));
    env.push(("TPDE_REMOTE_RETRIES", "1".into()));
    let out = server.run_with(&["inspect", &server.url("x.tpde")], &env);
    assert_eq!(code_of(&out), "E_REMOTE_RETRIES", "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_object_replaced_after_open_is_detected() {
    let server = Server::start();
    let dir = server.dir.path();
    let (base, target) = pair(dir);
    let url = server.url("ft.tpde");
    server.ok(&["encode", s(&base), s(&target), "-o", &url, "--chunk-words", "16384"]);
    let delta = server.open_delta("ft.tpde").expect("opens");
    server.ok(&["encode", s(&target), s(&base), "-o", &url, "--chunk-words", "16384", "--force"]);
    let err = delta.fetch_all().expect_err("the object changed");
    assert_eq!(err.code(), tpde::ErrorCode::RemoteChanged, "{err}");
    assert_eq!(err.file(), Some(Path::new("s3://tpde/ft.tpde")));
}

/// A checkpoint of 34 MiB that compresses to almost nothing, so that its rebuilt
/// target is uploaded in three parts (16 MiB each at most).
fn large_standalone(dir: &Path) -> PathBuf {
    let mut bytes = vec![0u8; 34 << 20];
    bytes[..4096].copy_from_slice(&noise(4096, 9));
    let ckpt = dir.join("large.safetensors");
    write_safetensors(&ckpt, &[("w", vec![17 << 20], bytes)]);
    let delta = dir.join("large.tpde");
    common::ok(&["encode", s(&ckpt), "-o", s(&delta)]);
    delta
}

#[test]
fn a_failed_upload_leaves_no_object_and_no_open_upload() {
    let server = Server::start();
    let dir = server.dir.path();
    let delta = large_standalone(dir);
    let key = "fail-part.safetensors";
    let out = server.run(&["apply", s(&delta), "-o", &server.url(key)]);
    assert!(!out.status.success());
    assert!(server.requests().iter().any(|r| r["method"] == "PUT" && r["status"] == 400), "a part was refused");
    assert!(!server.exists(key));
    assert_eq!(server.open_uploads(), 0, "the upload was aborted");
    // The next run, to a key the server accepts, succeeds.
    server.ok(&["apply", s(&delta), "-o", &server.url("ok.safetensors")]);
    assert!(server.exists("ok.safetensors"));
    assert_eq!(server.open_uploads(), 0);
}

#[test]
fn an_interrupted_upload_leaves_no_object_and_the_next_run_succeeds() {
    let server = Server::start();
    let dir = server.dir.path();
    let delta = large_standalone(dir);
    let key = "slow-part.safetensors";
    let url = server.url(key);
    let child = server.command(&["apply", s(&delta), "-o", &url], &server.env()).spawn().expect("tpde runs");
    // Once the multipart upload has started (its parts take a second each).
    let start = Instant::now();
    while !server
        .requests()
        .iter()
        .any(|r| r["method"] == "POST" && r["query"].as_str().is_some_and(|q| q.starts_with("uploads")))
    {
        assert!(start.elapsed() < Duration::from_secs(60), "the upload never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(i32::try_from(child.id()).expect("a pid"), libc::SIGTERM) }, 0);
    let out = wait_for(child);
    assert!(!out.status.success());
    assert!(!server.exists(key), "nothing at the key");
    assert_eq!(server.open_uploads(), 0, "the upload was aborted");
    server.ok(&["apply", s(&delta), "-o", &url]);
    assert!(server.exists(key));
    assert_eq!(server.open_uploads(), 0);
}

/// A sharded checkpoint in `dir`: two shards and their index.
fn sharded(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).expect("a dir");
    let shards = [("model-00001-of-00002.safetensors", "a"), ("model-00002-of-00002.safetensors", "b")];
    let mut weight_map = serde_json::Map::new();
    for (k, (file, name)) in shards.iter().enumerate() {
        write_safetensors(&dir.join(file), &[(name, vec![128, 64], noise(2 * 128 * 64, seed + k as u64))]);
        weight_map.insert((*name).to_owned(), serde_json::Value::String((*file).to_owned()));
    }
    let index = serde_json::json!({ "metadata": { "total_size": 2 * 2 * 128 * 64 }, "weight_map": weight_map });
    std::fs::write(dir.join(tpde::INDEX_FILE), index.to_string()).expect("the index");
}

#[test]
fn sharded_checkpoints_are_read_and_written_under_a_prefix() {
    let server = Server::start();
    let dir = server.dir.path();
    for (name, seed) in [("base", 1), ("target", 2)] {
        sharded(&dir.join(name), seed);
        for entry in std::fs::read_dir(dir.join(name)).expect("the shards") {
            let entry = entry.expect("an entry");
            let file = entry.file_name().into_string().expect("a UTF-8 name");
            server.put(&format!("sh/{name}/{file}"), &entry.path());
        }
    }
    let url = |rel: &str| server.url(&format!("sh/{rel}"));
    server.ok(&["encode", &url("base"), &url("target"), "-o", &url("d.tpde")]);
    server.ok(&["apply", &url("base"), &url("d.tpde"), "-o", &url("out")]);
    server.ok(&["verify", &url("base"), &url("d.tpde"), "--target", &url("out")]);
    let local = dir.join("out");
    server.ok(&["apply", s(&dir.join("base")), &url("d.tpde"), "-o", s(&local)]);
    for file in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        assert_eq!(std::fs::read(local.join(file)).unwrap(), std::fs::read(dir.join("target").join(file)).unwrap());
    }
    // Each file was uploaded once, the index after the shards.
    let mut requests = server.requests();
    requests.sort_by(|a, b| a["started"].as_f64().partial_cmp(&b["started"].as_f64()).expect("times"));
    let puts: Vec<String> = requests
        .iter()
        .filter(|r| r["method"] == "PUT" && r["status"] == 200)
        .filter_map(|r| r["path"].as_str().and_then(|p| p.strip_prefix("/tpde/sh/out/")).map(str::to_owned))
        .collect();
    assert_eq!(
        puts,
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", tpde::INDEX_FILE],
        "{puts:?}"
    );
}

/// Azurite, the Azure Blob Storage emulator, on 127.0.0.1 with a container `tpde`,
/// for one test (`azserver.py`; `tools/test-all.sh` installs Azurite from npm).
struct Azurite {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Azurite {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let azurite = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/azurite/node_modules/.bin/azurite-blob");
        assert!(
            azurite.exists(),
            "Azurite is missing: npm install --prefix target/azurite azurite@3.35.0 (tools/test-all.sh does)"
        );
        let (child, port) = start_server("azserver.py", &[&azurite, &dir.path().join("azurite")]);
        Self { child, port, dir }
    }

    /// Runs tpde against the emulator, with its well-known account, or with
    /// `key` as the account key.
    fn run_with_key(&self, args: &[&str], key: Option<&str>) -> Output {
        let mut command = Command::new(TPDE);
        command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (name, _) in std::env::vars() {
            if name.starts_with("AZURE_") || name.starts_with("AZURITE_") || name.starts_with("TPDE_") {
                command.env_remove(name);
            }
        }
        command
            .env("AZURE_STORAGE_USE_EMULATOR", "true")
            .env("AZURITE_BLOB_STORAGE_URL", format!("http://127.0.0.1:{}", self.port))
            .env("TPDE_REMOTE_RETRIES", "1");
        if let Some(key) = key {
            command.env("AZURE_STORAGE_ACCOUNT_KEY", key);
        }
        wait_for(command.spawn().expect("tpde runs"))
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.run_with_key(args, None);
        assert!(out.status.success(), "tpde {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        out
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn azure_blob_storage_round_trips_through_azurite() {
    let azure = Azurite::start();
    let dir = azure.dir.path();
    let (base, target) = pair(dir);
    let (d, b) = ("az://tpde/run/ft.tpde", "az://tpde/run/base.safetensors");
    // A delta and a checkpoint uploaded, then read back: by range, and whole.
    azure.ok(&["encode", s(&base), s(&target), "-o", d, "--chunk-words", "16384"]);
    let standalone = dir.join("base.tpde");
    common::ok(&["encode", s(&base), "-o", s(&standalone)]);
    azure.ok(&["apply", s(&standalone), "-o", b]);
    let rebuilt = dir.join("rebuilt.safetensors");
    azure.ok(&["apply", b, d, "-o", s(&rebuilt)]);
    assert_eq!(std::fs::read(&rebuilt).expect("rebuilt"), std::fs::read(&target).expect("target"));
    azure.ok(&["verify", b, d, "--target", s(&target)]);
    // Above one block: a multi-block upload.
    let large = large_standalone(dir);
    azure.ok(&["apply", s(&large), "-o", "az://tpde/run/large.safetensors"]);
    let large_copy = dir.join("large-copy.tpde");
    azure.ok(&["encode", "az://tpde/run/large.safetensors", "-o", s(&large_copy)]);
    assert_eq!(std::fs::read(&large_copy).expect("copy"), std::fs::read(&large).expect("delta"));
    // The codes of the failures.
    assert_eq!(code_of(&azure.run_with_key(&["inspect", "az://tpde/run/missing.tpde"], None)), "E_REMOTE_NOT_FOUND");
    let wrong_key = "d3Jvbmcga2V5IGZvciB0aGUgZW11bGF0b3I=";
    assert_eq!(code_of(&azure.run_with_key(&["inspect", d], Some(wrong_key))), "E_REMOTE_DENIED");
    assert_eq!(code_of(&azure.run_with_key(&["encode", s(&base), s(&target), "-o", d], None)), "E_OUTPUT_EXISTS");
}
