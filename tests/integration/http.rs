//! The HTTP server end to end: the real `loraplane-server` binary on 127.0.0.1, driven like an
//! SGLang client would. Batches of mixed adapters must equal single requests and the PEFT
//! reference; streaming, log-probs, stop handling, adapter load/unload, info endpoints,
//! start-up refusals and cancellation on disconnect are checked here. The OpenAI endpoints and
//! hostile input have their own modules (`http_openai`, `http_hostile`); they share [`Server`].

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{default_gguf, fixture, read_safetensors, RefTensor};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_loraplane-server");
/// The tiny fixture's adapters, loaded under their directory names.
pub const ADAPTERS: [&str; 4] = ["qv_r2", "mlp_r8_rslora", "all_r16", "attn_r4"];
/// Greedy tokens must match the reference until its top-2 margin drops below this.
const MARGIN: f64 = 1e-3;

/// A running server; killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    log: Arc<Mutex<String>>,
    client: reqwest::Client,
}

impl Server {
    /// Starts the binary with `args` (plus `--port 0`) and waits (bounded) until /health answers.
    pub async fn start(args: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args(args)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn loraplane-server");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        // Drains stderr for the server's whole life (a full pipe would block it) and reports
        // the address it bound.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("serving on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or_default().to_string();
                    let _ = tx.send(addr);
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(120)))
            .await
            .unwrap();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        let mut server = Server {
            child,
            base: String::new(),
            log,
            client,
        };
        let addr = match addr {
            Ok(a) => a,
            Err(_) => panic!("the server did not start:\n{}", server.log()),
        };
        server.base = format!("http://{addr}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = server.client.get(server.url("/health")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "/health never answered:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// The tiny Llama fixture with its four adapters, plus `extra` flags.
    pub async fn tiny(extra: &[&str]) -> Server {
        let model = fixture("tiny/llama");
        let paths: Vec<String> = ADAPTERS
            .iter()
            .map(|a| format!("{a}={}", fixture(&format!("tiny/adapters/{a}")).display()))
            .collect();
        let mut args = vec!["--model-path".to_string(), model.display().to_string()];
        args.push("--lora-paths".into());
        args.extend(paths);
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start(&refs).await
    }

    /// The default model (SmolLM2-135M-Instruct GGUF), plus `extra` flags.
    pub async fn smollm(extra: &[&str]) -> Server {
        let model = default_gguf().display().to_string();
        let mut args = vec!["--model-path", model.as_str()];
        args.extend_from_slice(extra);
        Server::start(&args).await
    }

    /// `base + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The HTTP client (bounded timeouts).
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// POSTs JSON; returns the status and the JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.client.post(self.url(path)).json(body).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
        (status, v)
    }

    /// GETs JSON.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// POSTs and collects an SSE response: the JSON of each `data:` line, and whether it ended
    /// with `[DONE]`.
    pub async fn post_sse(&self, path: &str, body: &Value) -> (Vec<Value>, bool) {
        let r = self.client.post(self.url(path)).json(body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        let text = r.text().await.unwrap();
        let mut events = Vec::new();
        let mut done = false;
        for line in text.lines().filter(|l| !l.is_empty()) {
            let data = line
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not SSE data: {line}"));
            assert!(!done, "data after [DONE]: {text}");
            if data == "[DONE]" {
                done = true;
            } else {
                events.push(serde_json::from_str(data).unwrap());
            }
        }
        (events, done)
    }

    /// `(waiting, running)` from /get_server_info.
    pub async fn load(&self) -> (u64, u64) {
        let (_, info) = self.get("/get_server_info").await;
        let s = &info["internal_states"][0];
        (
            s["num_waiting_reqs"].as_u64().unwrap(),
            s["num_running_reqs"].as_u64().unwrap(),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary with `args` to its end (bounded); returns its status and stderr.
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String) {
    // Startup binds before loading the model, so tests that run in parallel must not share
    // the default port: an ephemeral one keeps "address in use" from masking the error under test.
    let port: &[&str] = if args.contains(&"--port") {
        &[]
    } else {
        &["--port", "0"]
    };
    let mut child = Command::new(BIN)
        .args(port)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("loraplane-server {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The PEFT reference: prompts and greedy continuations per case.
pub struct Reference {
    tensors: std::collections::HashMap<String, RefTensor>,
    /// Number of prompts.
    pub prompts: usize,
}

impl Reference {
    /// Loads `tests/fixtures/tiny/reference.*`.
    pub fn load() -> Self {
        let tensors = read_safetensors(&fixture("tiny/reference.safetensors"));
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture("tiny/reference.json")).unwrap()).unwrap();
        let prompts = json["prompts"].as_array().unwrap().len();
        Reference { tensors, prompts }
    }

    /// Prompt `p`'s token ids.
    pub fn prompt(&self, p: usize) -> Vec<u32> {
        self.tensors[&format!("prompt.{p}")].ids()
    }

    /// Asserts that `got` equals the greedy reference of `case` (`llama` or `llama+<adapter>`)
    /// for prompt `p`, up to the first step too close to call.
    pub fn check_greedy(&self, case: &str, p: usize, got: &[u32]) {
        let want = self.tensors[&format!("greedy.{case}.{p}")].ids();
        let margin = &self.tensors[&format!("margin.{case}.{p}")].data;
        assert_eq!(got.len(), want.len(), "{case} prompt {p}");
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            if margin[i] < MARGIN {
                return;
            }
            assert_eq!(
                g, w,
                "{case} prompt {p}: greedy token {i} differs ({got:?} vs {want:?})"
            );
        }
    }
}

/// `output_ids` of a /generate output as ids.
pub fn ids_of(v: &Value) -> Vec<u32> {
    v["output_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no output_ids in {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn greedy_params(n: usize) -> Value {
    json!({"max_new_tokens": n, "temperature": 0, "ignore_eos": true})
}

#[tokio::test]
async fn mixed_adapter_batch_equals_single_requests_and_peft() {
    let s = Server::tiny(&["--max-loras-per-batch", "4"]).await;
    let r = Reference::load();
    let cases: Vec<Option<&str>> = std::iter::once(None)
        .chain(ADAPTERS.iter().map(|a| Some(*a)))
        .collect();
    let mut prompts = Vec::new();
    let mut loras = Vec::new();
    for p in 0..r.prompts {
        for c in &cases {
            prompts.push(r.prompt(p));
            loras.push(*c);
        }
    }
    let (status, batch) = s
        .post(
            "/generate",
            &json!({"input_ids": prompts, "lora_path": loras, "sampling_params": greedy_params(16)}),
        )
        .await;
    assert_eq!(status, 200, "{batch}");
    let outs = batch.as_array().unwrap();
    assert_eq!(outs.len(), prompts.len());
    for (i, out) in outs.iter().enumerate() {
        let case = match loras[i] {
            None => "llama".to_string(),
            Some(a) => format!("llama+{a}"),
        };
        let got = ids_of(out);
        r.check_greedy(&case, i / cases.len(), &got);
        assert_eq!(
            out["meta_info"]["finish_reason"],
            json!({"type": "length", "length": 16})
        );
        assert_eq!(out["meta_info"]["completion_tokens"], 16);
        assert_eq!(out["meta_info"]["prompt_tokens"], prompts[i].len());
        // One request alone gives the same tokens and text as inside the mixed batch.
        let (status, single) = s
            .post(
                "/generate",
                &json!({"input_ids": prompts[i], "lora_path": loras[i], "sampling_params": greedy_params(16)}),
            )
            .await;
        assert_eq!(status, 200, "{single}");
        assert!(single.is_object(), "a single prompt answers an object");
        assert_eq!(ids_of(&single), got, "{case}: single vs batch");
        assert_eq!(single["text"], out["text"]);
    }
}

#[tokio::test]
async fn streaming_generate_is_cumulative_and_matches_the_plain_answer() {
    let s = Server::tiny(&[]).await;
    let r = Reference::load();
    let body = json!({
        "input_ids": [r.prompt(0), r.prompt(1)],
        "lora_path": ["all_r16", null],
        "sampling_params": greedy_params(12),
    });
    let (_, plain) = s.post("/generate", &body).await;
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (events, done) = s.post_sse("/generate", &streamed).await;
    assert!(done, "the stream ends with data: [DONE]");
    for index in 0..2 {
        let chunks: Vec<&Value> = events.iter().filter(|e| e["index"] == index).collect();
        assert!(chunks.len() >= 2, "{events:?}");
        for w in chunks.windows(2) {
            let (a, b) = (w[0]["text"].as_str().unwrap(), w[1]["text"].as_str().unwrap());
            assert!(b.starts_with(a), "text is cumulative: {a:?} then {b:?}");
            assert!(w[0]["meta_info"]["finish_reason"].is_null());
        }
        let last = chunks.last().unwrap();
        assert_eq!(last["meta_info"]["finish_reason"]["type"], "length");
        assert_eq!(last["text"], plain[index]["text"]);
        assert_eq!(ids_of(last), ids_of(&plain[index]));
    }
    // A single prompt streams objects without `index`.
    let (events, done) = s
        .post_sse(
            "/generate",
            &json!({"text": "Once upon a time", "sampling_params": greedy_params(4), "stream": true}),
        )
        .await;
    assert!(
        done && events.iter().all(|e| e.get("index").is_none()),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap()["meta_info"]["completion_tokens"], 4);
}

/// `max_new_tokens: 0` scores the prompt without generating: SGLang's scoring use, checked
/// against PEFT's log-probabilities.
#[tokio::test]
async fn prefill_only_requests_score_the_prompt_like_peft() {
    let s = Server::tiny(&[]).await;
    let reference = crate::common::read_safetensors(&crate::common::fixture("tiny/reference.safetensors"));
    let prompt = reference["prompt.3"].ids();
    let want = &reference["logprobs.llama+qv_r2.3"];
    let vocab = want.shape[1];
    let (status, out) = s
        .post(
            "/generate",
            &json!({"input_ids": prompt, "lora_path": "qv_r2", "sampling_params": {"max_new_tokens": 0},
                    "return_logprob": true, "logprob_start_len": 0}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(ids_of(&out), Vec::<u32>::new());
    assert_eq!(out["meta_info"]["completion_tokens"], 0);
    assert_eq!(out["meta_info"]["finish_reason"]["type"], "length");
    let input = out["meta_info"]["input_token_logprobs"].as_array().unwrap();
    assert_eq!(input.len(), prompt.len());
    for i in 1..prompt.len() {
        let expected = want.data[(i - 1) * vocab + prompt[i] as usize];
        let got = input[i][0].as_f64().unwrap();
        assert!(
            (got - expected).abs() < 1e-4,
            "position {i}: {got} vs PEFT {expected}"
        );
    }
}

#[tokio::test]
async fn logprobs_have_sglang_shapes() {
    let s = Server::tiny(&[]).await;
    let r = Reference::load();
    let prompt = r.prompt(2);
    let (status, out) = s
        .post(
            "/generate",
            &json!({
                "input_ids": prompt,
                "lora_path": "qv_r2",
                "sampling_params": greedy_params(5),
                "return_logprob": true,
                "logprob_start_len": 0,
                "top_logprobs_num": 3,
                "return_text_in_logprobs": true,
            }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    let m = &out["meta_info"];
    let input = m["input_token_logprobs"].as_array().unwrap();
    assert_eq!(input.len(), prompt.len());
    assert!(input[0][0].is_null(), "the first prompt position has no log-prob");
    for (i, e) in input.iter().enumerate() {
        assert_eq!(e[1], prompt[i], "input entry {i}: {e}");
        assert!(e[2].is_string(), "text is returned when asked: {e}");
        if i > 0 {
            assert!(e[0].as_f64().unwrap() <= 0.0);
        }
    }
    let output = m["output_token_logprobs"].as_array().unwrap();
    let ids = ids_of(&out);
    assert_eq!(output.len(), ids.len());
    let tops = m["output_top_logprobs"].as_array().unwrap();
    assert_eq!(tops.len(), ids.len());
    for (i, top) in tops.iter().enumerate() {
        let top = top.as_array().unwrap();
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0][1], ids[i]);
        assert!((top[0][0].as_f64().unwrap() - output[i][0].as_f64().unwrap()).abs() < 1e-6);
    }
    let input_top = m["input_top_logprobs"].as_array().unwrap();
    assert_eq!(input_top.len(), prompt.len());
    assert!(input_top[0].is_null());
    assert_eq!(input_top[1].as_array().unwrap().len(), 3);

    // Default logprob_start_len (-1): none of the prompt; text stays null unless asked.
    let (_, out) = s
        .post(
            "/generate",
            &json!({"input_ids": prompt, "sampling_params": greedy_params(2), "return_logprob": true}),
        )
        .await;
    assert_eq!(out["meta_info"]["input_token_logprobs"], json!([]));
    let output = out["meta_info"]["output_token_logprobs"].as_array().unwrap();
    assert_eq!(output.len(), 2);
    assert!(output[0][2].is_null());
    assert!(out["meta_info"].get("output_top_logprobs").is_none());
}

#[tokio::test]
async fn stop_strings_and_stop_tokens_trim_like_sglang() {
    let s = Server::tiny(&[]).await;
    let r = Reference::load();
    let prompt = r.prompt(1);
    let gen = |extra: Value| {
        let mut sp = greedy_params(16);
        for (k, v) in extra.as_object().unwrap() {
            sp[k] = v.clone();
        }
        json!({"input_ids": prompt, "lora_path": "attn_r4", "sampling_params": sp})
    };
    let (_, full) = s.post("/generate", &gen(json!({}))).await;
    let text = full["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = text.chars().collect();
    // A two-character stop string whose first occurrence is inside the text.
    let (k, stop) = (1..chars.len().saturating_sub(2))
        .map(|k| (k, chars[k..k + 2].iter().collect::<String>()))
        .find(|(k, st)| {
            let byte = chars[..*k].iter().collect::<String>().len();
            text.find(st.as_str()) == Some(byte) && !st.contains('\u{FFFD}')
        })
        .expect("a usable stop string");
    let before: String = chars[..k].iter().collect();
    let (_, out) = s
        .post("/generate", &gen(json!({"stop": [stop.clone(), "never-seen"]})))
        .await;
    assert_eq!(out["text"], before, "the stop string is trimmed");
    assert_eq!(
        out["meta_info"]["finish_reason"],
        json!({"type": "stop", "matched": stop})
    );
    let (_, out) = s
        .post(
            "/generate",
            &gen(json!({"stop": stop.clone(), "no_stop_trim": true})),
        )
        .await;
    assert_eq!(out["text"], format!("{before}{stop}"));

    // A stop token: it ends the output ids, and its text is left out.
    let ids = ids_of(&full);
    let j = (2..ids.len())
        .find(|&j| !ids[..j].contains(&ids[j]))
        .expect("a fresh token");
    let (_, out) = s
        .post("/generate", &gen(json!({"stop_token_ids": [ids[j]]})))
        .await;
    assert_eq!(ids_of(&out), ids[..=j].to_vec());
    assert_eq!(
        out["meta_info"]["finish_reason"],
        json!({"type": "stop", "matched": ids[j]})
    );
    let (_, shorter) = s.post("/generate", &gen(json!({"max_new_tokens": j}))).await;
    assert_eq!(out["text"], shorter["text"]);
}

#[tokio::test]
async fn n_samples_and_seeds() {
    let s = Server::tiny(&[]).await;
    let body = |seed: u64| {
        json!({"text": "Once upon a time", "lora_path": "mlp_r8_rslora",
               "sampling_params": {"n": 3, "max_new_tokens": 8, "temperature": 1.0, "seed": seed, "ignore_eos": true}})
    };
    let (status, a) = s.post("/generate", &body(7)).await;
    assert_eq!(status, 200, "{a}");
    let a = a.as_array().expect("n > 1 answers a list").clone();
    assert_eq!(a.len(), 3);
    let (_, b) = s.post("/generate", &body(7)).await;
    for i in 0..3 {
        assert_eq!(ids_of(&a[i]), ids_of(&b[i]), "same seed, same samples");
    }
    let distinct: std::collections::HashSet<Vec<u32>> = a.iter().map(ids_of).collect();
    assert!(distinct.len() > 1, "samples of one request differ: {a:?}");
}

#[tokio::test]
async fn adapters_load_and_unload_at_runtime() {
    let s = Server::tiny(&["--max-loras-per-batch", "2"]).await;
    let r = Reference::load();
    let path = fixture("tiny/adapters/qv_r2").display().to_string();
    let gen = |name: &str| json!({"input_ids": r.prompt(3), "lora_path": name, "sampling_params": greedy_params(16)});
    let (status, out) = s
        .post(
            "/load_lora_adapter",
            &json!({"lora_name": "fresh", "lora_path": path}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["success"], true);
    assert_eq!(out["error_message"], "");
    assert_eq!(out["loaded_adapters"]["fresh"], path.as_str());
    assert_eq!(out["loaded_adapters"].as_object().unwrap().len(), 5);

    let (status, out) = s.post("/generate", &gen("fresh")).await;
    assert_eq!(status, 200, "{out}");
    r.check_greedy("llama+qv_r2", 3, &ids_of(&out));
    let (_, models) = s.get("/v1/models").await;
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "fresh"));

    // The same name twice, a missing directory, a missing field: refused, nothing changes.
    let (status, out) = s
        .post(
            "/load_lora_adapter",
            &json!({"lora_name": "fresh", "lora_path": path}),
        )
        .await;
    assert_eq!((status, &out["success"]), (400, &json!(false)), "{out}");
    assert!(out["error_message"].as_str().unwrap().contains("already loaded"));
    let (status, out) = s
        .post(
            "/load_lora_adapter",
            &json!({"lora_name": "ghost", "lora_path": "/nonexistent/adapter"}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        out["error_message"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/adapter"),
        "{out}"
    );
    let (status, out) = s.post("/load_lora_adapter", &json!({"lora_name": "x"})).await;
    assert_eq!(status, 400);
    assert!(
        out["error_message"].as_str().unwrap().contains("lora_path"),
        "{out}"
    );

    // Pinning: with 2 slots at most one adapter may be pinned.
    let (status, out) = s
        .post(
            "/load_lora_adapter",
            &json!({"lora_name": "pinned", "lora_path": path, "pinned": true}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    let (status, out) = s
        .post(
            "/load_lora_adapter",
            &json!({"lora_name": "pinned2", "lora_path": path, "pinned": true}),
        )
        .await;
    assert_eq!(status, 400, "{out}");

    let (status, out) = s
        .post("/unload_lora_adapter", &json!({"lora_name": "fresh"}))
        .await;
    assert_eq!((status, &out["success"]), (200, &json!(true)), "{out}");
    assert!(out["loaded_adapters"].get("fresh").is_none());
    let (status, out) = s.post("/generate", &gen("fresh")).await;
    assert_eq!(status, 400);
    assert!(
        out["error"]["message"].as_str().unwrap().contains("\"fresh\""),
        "{out}"
    );
    let (status, _) = s
        .post("/unload_lora_adapter", &json!({"lora_name": "fresh"}))
        .await;
    assert_eq!(status, 400);
    // Reloading under the same name works after an unload.
    let (status, _) = s
        .post(
            "/load_lora_adapter",
            &json!({"lora_name": "fresh", "lora_path": path}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, out) = s.post("/generate", &gen("fresh")).await;
    r.check_greedy("llama+qv_r2", 3, &ids_of(&out));
}

#[tokio::test]
async fn adapter_endpoints_need_lora_enabled() {
    let model = fixture("tiny/llama").display().to_string();
    let s = Server::start(&["--model-path", &model]).await;
    let path = fixture("tiny/adapters/qv_r2").display().to_string();
    let (status, out) = s
        .post(
            "/load_lora_adapter",
            &json!({"lora_name": "a", "lora_path": path}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        out["error_message"].as_str().unwrap().contains("--enable-lora"),
        "{out}"
    );
    let (status, out) = s
        .post("/generate", &json!({"text": "hi", "lora_path": "a"}))
        .await;
    assert_eq!(status, 400);
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--enable-lora"),
        "{out}"
    );

    // With --enable-lora and no adapters, loading at runtime works.
    let s = Server::start(&["--model-path", &model, "--enable-lora", "--max-lora-rank", "4"]).await;
    let (status, out) = s
        .post(
            "/load_lora_adapter",
            &json!({"lora_name": "a", "lora_path": path}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    // Rank 16 is over --max-lora-rank 4: refused by the engine, reported as success: false.
    let big = fixture("tiny/adapters/all_r16").display().to_string();
    let (status, out) = s
        .post("/load_lora_adapter", &json!({"lora_name": "b", "lora_path": big}))
        .await;
    assert_eq!(status, 400, "{out}");
    assert_eq!(out["success"], false);
}

#[tokio::test]
async fn info_health_and_metrics_endpoints() {
    let s = Server::tiny(&["--served-model-name", "tiny", "--max-running-requests", "7"]).await;
    let (status, _) = s.get("/health").await;
    assert_eq!(status, 200);
    let (status, _) = s.get("/health_generate").await;
    assert_eq!(status, 200);
    let (status, info) = s.get("/get_model_info").await;
    assert_eq!(status, 200);
    assert_eq!(info["is_generation"], true);
    assert!(info["model_path"].as_str().unwrap().ends_with("tiny/llama"));
    assert!(info["tokenizer_path"].is_string());
    let (_, info) = s.get("/get_server_info").await;
    assert_eq!(info["served_model_name"], "tiny");
    assert_eq!(info["max_running_requests"], 7);
    assert_eq!(info["max_loras_per_batch"], 8);
    assert_eq!(info["enable_lora"], true);
    assert_eq!(info["context_length"], 256);
    assert_eq!(info["lora_paths"].as_array().unwrap().len(), 4);
    let r = s.client().get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text().await.unwrap();
    assert!(text.contains("loraplane_lora_slots_total"), "{text}");
    assert!(text.contains("loraplane_generated_tokens_total"), "{text}");
}

#[tokio::test]
async fn startup_refuses_contradictions_with_exit_code_2() {
    let model = fixture("tiny/llama").display().to_string();
    let qv = format!("qv={}", fixture("tiny/adapters/qv_r2").display());
    let pinned = format!(
        r#"{{"lora_name":"p","lora_path":"{}","pinned":true}}"#,
        fixture("tiny/adapters/qv_r2").display()
    );
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--enable-lora",
                "--max-loras-per-batch",
                "4",
                "--max-loaded-loras",
                "2",
            ],
            "--max-loaded-loras",
        ),
        (
            vec!["--max-loras-per-batch", "1", "--lora-paths", &pinned],
            "pinned",
        ),
        (vec!["--max-lora-rank", "8"], "--enable-lora"),
        (vec!["--tp-size", "2"], "--tp-size"),
        (vec!["--dtype", "bfloat16"], "--dtype"),
        (
            vec!["--lora-paths", &qv, "--enable-lora-overlap-loading"],
            "--enable-lora-overlap-loading",
        ),
        (vec!["--dtype", "float16"], "--dtype float16"),
        (
            vec!["--enable-lora", "--max-lora-chunk-size", "24"],
            "--max-lora-chunk-size",
        ),
        (vec!["--lora-backend", "flashinfer"], "--lora-backend"),
        (vec!["--context-length", "512"], "max_position_embeddings"),
        (vec!["--lora-paths", &qv, &qv], "twice"),
        // A host KV cache larger than the machine's memory, named instead of an aborted allocation.
        (vec!["--max-total-tokens", "100000000000"], "--max-total-tokens"),
        (vec!["--mem-fraction-static", "1.5"], "--mem-fraction-static"),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["--model-path", model.as_str()];
        args.extend(flags.iter().copied());
        let (status, stderr) = run_to_exit(&args);
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // `generate` and the server's flags do not mix.
    let (status, _) = run_to_exit(&[
        "--port",
        "1",
        "generate",
        "--model-path",
        &model,
        "--prompt",
        "hi",
    ]);
    assert_eq!(status.code(), Some(2));
}

/// CI machines have no GPU: `--device cuda` must say so (no panic from the driver loader).
#[test]
fn device_cuda_without_a_gpu_says_so() {
    if std::path::Path::new("/dev/nvidia0").exists() {
        return; // a GPU machine: scripts/gpu/serve_check.py covers --device cuda there
    }
    let model = fixture("tiny/llama").display().to_string();
    let (status, stderr) = run_to_exit(&["--model-path", &model, "--device", "cuda"]);
    assert_ne!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("no NVIDIA driver found") || stderr.contains("libnvrtc or libcublas"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn adapters_over_the_limits_stop_startup() {
    let model = fixture("tiny/llama").display().to_string();
    let all = format!("all={}", fixture("tiny/adapters/all_r16").display());
    for (flags, needle) in [
        (vec!["--lora-paths", all.as_str(), "--max-lora-rank", "8"], "rank"),
        (
            vec![
                "--lora-paths",
                all.as_str(),
                "--lora-target-modules",
                "q_proj",
                "v_proj",
            ],
            "proj",
        ),
        (
            vec!["--lora-paths", "x=/nonexistent/adapter"],
            "/nonexistent/adapter",
        ),
    ] {
        let mut args = vec!["--model-path", model.as_str()];
        args.extend(flags);
        let (status, stderr) = run_to_exit(&args);
        assert!(!status.success(), "{args:?} must fail");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Polls until the engine is idle (bounded); returns whether it got there.
async fn becomes_idle(s: &Server) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if s.load().await == (0, 0) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn aborted(s: &Server) -> u64 {
    let text = s
        .client()
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("loraplane_requests_finished_total{reason=\"cancelled\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_its_request() {
    let s = Server::smollm(&[]).await;
    let long = json!({"text": "Tell me a long story.", "sampling_params": {"max_new_tokens": 6000, "ignore_eos": true}});
    for stream in [false, true] {
        let mut body = long.clone();
        body["stream"] = json!(stream);
        let before = aborted(&s).await;
        let short = reqwest::Client::builder()
            .timeout(Duration::from_millis(700))
            .build()
            .unwrap();
        let sent = async {
            let r = short.post(s.url("/generate")).json(&body).send().await?;
            r.text().await
        };
        assert!(
            sent.await.is_err(),
            "the request must still be running when the client leaves"
        );
        assert!(
            becomes_idle(&s).await,
            "stream={stream}: the engine kept running the request"
        );
        assert_eq!(aborted(&s).await, before + 1, "stream={stream}");
    }
    // The server still answers.
    let (status, out) = s
        .post(
            "/generate",
            &json!({"text": "Hi", "sampling_params": {"max_new_tokens": 2}}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
}
