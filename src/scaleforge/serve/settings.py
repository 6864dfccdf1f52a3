"""`scaleforge serve`'s settings, apart from the server's modules (FastAPI, uvicorn), so that the command's options
(generated from these fields) are known without them: `scaleforge serve --help` is quick, and a base install says
which extra serving needs only when asked to serve."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ServeSettings:
    """`scaleforge serve`'s options: one a field, its flag the field's name (`--max-batch-size`), its help text
    `metadata["help"]` (`range`, `metavar` and `choices` there too where the flag has them: see cli/fields.py)."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0: every interface)"})
    port: int = field(default=8000, metadata={"range": "port", "help": "port (0: any free one, printed)"})
    max_batch_size: int = field(default=32, metadata={"range": "positive", "help": "instances per batch, at most"})
    max_step_tokens: int = field(
        default=512,
        metadata={
            "range": "positive",
            "help": "a language model's completions: the most tokens one decoding step reads, one for each running "
            "sequence and the rest for prompts' chunks, so that a long prompt delays the others one step at most "
            "(--max-batch-size sequences run at once)",
        },
    )
    batching: Literal["continuous", "static"] = field(
        default="continuous",
        metadata={
            "help": "a language model's completions: continuous (waiting sequences join at any step with a free slot) "
            "or static (they join only when no sequence is running, and each batch keeps its shape, ended sequences "
            "decoded as padding, until its longest sequence ends: the baseline `scaleforge bench generate` "
            "measures continuous batching against)"
        },
    )
    max_delay_ms: float = field(
        default=5.0, metadata={"range": "non-negative", "help": "longest wait for a batch to fill"}
    )
    max_queue: int = field(default=256, metadata={"range": "positive", "help": "queued requests before 503"})
    timeout_ms: float = field(default=2000.0, metadata={"range": "positive", "help": "queued longer: 504, never run"})
    cache_size: int = field(default=0, metadata={"range": "non-negative", "help": "LRU of results (0: none)"})
    max_body_mb: float | None = field(
        default=None,
        metadata={
            "range": "positive",
            "help": "larger bodies get 413 (unset: from the model's input, twice --max-batch-size instances at their "
            "largest JSON size plus 64 KiB; for image uploads, a 4096x4096 RGB image uncompressed plus 64 KiB)",
        },
    )
    api_key: str | None = field(
        default=None,
        metadata={"help": "require this key (X-API-Key or Authorization: Bearer) on every endpoint but /health/*"},
    )
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"})
    threads: int = field(
        default=0,
        metadata={
            "range": "non-negative",
            "help": "torch threads for the model (0: every core if that runs a full batch 1.3x faster, else one fewer)",
        },
    )
    model_process: bool | None = field(  # None: auto
        default=None,
        metadata={
            "help": "run the model in a process of its own, in parallel with HTTP (--no-model-process: a thread; "
            "auto: a process on a CPU when the model's compute dominates, a full batch taking >= 0.5 ms an instance)"
        },
    )
    workers: int = field(
        default=1,
        metadata={
            "range": "positive",
            "help": "model processes serving the model (with --repository, each version of every model but language "
            "models, which decode in the server's process), that many batches running at once; one HTTP process "
            "keeps request ids, feedback, A/B counts, the queue and reloads for all. Each gets --threads torch "
            "threads (0: the cores shared out). 1: the model on a thread or in one process, see --model-process",
        },
    )
    drain_grace_s: float = field(
        default=0.0,
        metadata={
            "range": "non-negative",
            "help": "after SIGTERM, keep serving this long with /health/ready at 503 (for load balancers), then drain",
        },
    )
    batch_timeout_s: float = field(
        default=60.0,
        metadata={
            "range": "positive",
            "help": "a batch the model has not answered in this long is taken for hung and its requests get 503: a "
            "model process is restarted; while a model on a thread is hung, /health/live and new requests get 503",
        },
    )
    latency_target_ms: float = field(
        default=0.0,
        metadata={
            "range": "non-negative",
            "help": "keep batches small enough, and refuse at once what could not be answered, to answer within this "
            "(0: off)",
        },
    )
    backend: str = field(
        default="torch",
        metadata={
            "help": "onnxruntime: serve the run's ONNX export (see --onnx) with ONNX Runtime, with the same API, "
            "batching and metrics",
            "choices": ("torch", "onnxruntime"),
        },
    )
    onnx: str | None = field(
        default=None,
        metadata={
            "help": "the ONNX file for --backend onnxruntime (default: RUN_DIR/exported/model.onnx, written by "
            "`scaleforge export RUN_DIR --format onnx --dynamic-batch`)",
            "metavar": "FILE",
        },
    )
    trust_code: bool = field(
        default=False,
        metadata={"help": "import the modules the run's config names (imports:) and build its module:Attr components"},
    )
    signing_key_env: str | None = field(
        default=None,
        metadata={
            "help": "refuse the run unless its manifest is signed (HMAC-SHA256) with the key in this environment "
            "variable",
            "metavar": "VAR",
        },
    )
    repository: str | None = field(
        default=None,
        metadata={
            "help": "serve every model of this model repository, DIR/<name>/<version>/ (instead of RUN_DIR), each "
            "version a run directory or its final/; DIR/<name>/serving.yaml sets its versions, traffic and batching",
            "metavar": "DIR",
        },
    )
    default_model: str | None = field(
        default=None,
        metadata={
            "help": "with --repository: the model /v1/predict serves (default: the first by name with a ready version)",
            "metavar": "NAME",
        },
    )
    poll_s: float = field(
        default=2.0,
        metadata={
            "range": "non-negative",
            "help": "with --repository: scan it for new, changed and removed versions this often (0: only on "
            "POST /v1/admin/reload)",
        },
    )
    feedback_log: str | None = field(
        default=None,
        metadata={
            "help": "with --repository: append every request answered and every outcome given (POST /v1/feedback) "
            "to this file as JSON lines, for `scaleforge ab report FILE`",
            "metavar": "FILE",
        },
    )
    tls_cert: str | None = field(
        default=None, metadata={"help": "serve HTTPS with this PEM certificate (with --tls-key)", "metavar": "FILE"}
    )
    tls_key: str | None = field(
        default=None, metadata={"help": "the certificate's PEM private key (with --tls-cert)", "metavar": "FILE"}
    )
