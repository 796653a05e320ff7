"""Settings for every service, read from ``LOOMIS_*`` environment variables (and ``.env``).

Nested concerns use a double underscore: ``LOOMIS_REDIS__URL``, ``LOOMIS_STORAGE__BACKEND``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SIGNING_SECRET = "dev-insecure-signing-secret"


class DatabaseSettings(BaseModel):
    """Where durable records live; only the gateway and the CLI open it."""

    url: str = Field(
        default="",
        description="SQLAlchemy async URL. Empty: SQLite file in the data directory. "
        "PostgreSQL: postgresql+asyncpg://user:pass@host/db",
    )
    auto_migrate: bool = Field(default=True, description="Run Alembic migrations at gateway start.")
    echo: bool = False
    # SQLAlchemy's 5 + 10 made a gateway under a few dozen concurrent requests open and close
    # a connection (on SQLite: a thread and its PRAGMAs) for every request past the fifth.
    pool_size: int | None = Field(default=None, ge=1, description="Connections the gateway keeps "
                                  "open; default 40 on SQLite (each is a thread of the gateway; "
                                  "opening one under load cost more than the query), 20 on "
                                  "PostgreSQL (server connections are scarce).")
    max_overflow: int = Field(default=20, ge=0,
                              description="Extra connections opened under load, closed after.")


class RedisSettings(BaseModel):
    """Queue, live status and the event stream."""

    url: str = "redis://127.0.0.1:6379/0"
    events_stream: str = "loomis:events"
    events_maxlen: int = Field(default=200_000, description="Approximate cap of the global stream.")
    job_ttl_s: int = Field(default=7 * 24 * 3600, description="How long live job state stays.")
    events_dead_letter_stream: str = Field(
        default="loomis:events:dead",
        description="Where events the gateway could not record are parked, with the error.")


class StorageSettings(BaseModel):
    """Artifacts and inputs: any S3 endpoint, or a local directory for the embedded mode."""

    backend: Literal["local", "s3"] = "local"
    local_root: Path | None = Field(default=None, description="Empty: <data_dir>/objects.")
    bucket: str = "loomis"
    endpoint_url: str | None = Field(default=None, description="e.g. http://minio:9000")
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    create_bucket: bool = Field(default=True, description="Create the bucket when missing.")
    presign_expires_s: int = 3600


class GatewaySettings(BaseModel):
    """The HTTP front door."""

    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str = Field(
        default="",
        description="Base URL clients reach the gateway at (for local-storage download "
        "links). Empty: http://<host>:<port>.",
    )
    signing_secret: SecretStr = SecretStr(DEV_SIGNING_SECRET)
    consumer_group: str = "gateway"
    consumer_claim_idle_ms: int = Field(
        default=30_000,
        description="Events a dead gateway read but never acknowledged are taken over "
        "after this idle time; an event that failed to apply is retried after it too.",
    )
    consumer_max_attempts: int = Field(
        default=5, ge=1,
        description="Tries to record one event before it is parked in the dead-letter stream "
        "and its job fails with event_unprocessable (lost database connections do not count).",
    )
    consumer_batch: int = 100
    telemetry: bool = Field(
        default=False,
        description="FastAPI's native OpenTelemetry spans and metrics, exported to the "
        "providers that OTEL_* settings configure.",
    )
    subjects_sweep_interval_s: float = Field(
        default=5.0, gt=0, description="How often unfinished subjects, photo deletions and "
        "deletions under way are looked at again (what finishes them after a crash).")
    max_body_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="The largest body read whole (JSON, "
        "with webui's base64 images); larger is a 413. Multipart uploads have their own limits.")
    queue_recovery_interval_s: float = Field(
        default=15.0, gt=0, description="How often jobs that are queued in the database are "
        "checked against the queue: one a stopped gateway committed but never queued is "
        "queued then (or failed with not_queued when Redis lost it too).")


class ModelSettings(BaseModel):
    """Where models come from, for the gateway and every worker alike.

    These were ``LOOMIS_GENERATOR__*`` settings while only the generator loaded models; the
    old names still work (see :data:`LEGACY_GENERATOR_MODEL_FIELDS`).
    """

    cache_dir: Path | None = Field(
        default=None,
        description="Built tiny models, hub snapshots (hub/), weight hashes. Empty: "
        "<data_dir>/models. Was LOOMIS_GENERATOR__MODEL_CACHE.")
    allow_downloads: bool = Field(
        default=False,
        description="Let workers fetch hub ids missing from the cache. "
        "Was LOOMIS_GENERATOR__ALLOW_DOWNLOADS.")
    models_file: Path | None = Field(
        default=None,
        description="TOML file adding or overriding model presets. "
        "Was LOOMIS_GENERATOR__MODELS_FILE.")
    models_dir: Path | None = Field(
        default=None,
        description="A folder scanned like a webui's models/Stable-diffusion: each "
        "<name>.safetensors checkpoint and each diffusers folder in it is a preset named after "
        "it (family from the file). Gateway, generators and trainers must see the same folder. "
        "Was LOOMIS_GENERATOR__MODELS_DIR.",
    )


# Model settings that used to live under ``generator`` and are still read from there (the
# LOOMIS_GENERATOR__* variables of existing deployments); a new name set too wins.
LEGACY_GENERATOR_MODEL_FIELDS = {
    "model_cache": "cache_dir",
    "allow_downloads": "allow_downloads",
    "models_file": "models_file",
    "models_dir": "models_dir",
}


class GeneratorSettings(BaseModel):
    """The text-to-image worker."""

    default_model: str = "tiny-sd15"
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:1, mps")
    poll_delay_s: float = Field(
        default=0.05,
        description="How often an idle worker polls the queue. arq's 0.5 s default adds "
        "~250 ms to every job on average; 50 ms costs ~20 cheap Redis calls/s.",
    )
    job_timeout_s: int = 1800
    max_tries: int = 3
    max_loaded_models: int = 1
    max_model_bytes: int = Field(
        default=0, ge=0,
        description="Weight bytes the loaded models (with their ControlNets/inpainting UNets) "
        "may take together; least recently used models are unloaded beyond it. 0: no limit.",
    )
    max_loaded_loras: int = Field(default=8, ge=1, description="LoRA adapters kept loaded "
                                  "per model; the least recently used is unloaded beyond this.")
    batch_size: int = Field(
        default=1, ge=1, le=32,
        description="Compatible queued jobs (same model, mode, size, steps, guidance, "
        "scheduler, LoRAs) run as one pipeline call of up to this many jobs. 1 turns it off.",
    )
    batch_exact: bool = Field(
        default=True,
        description="Grouped jobs keep exactly the pixels they get alone: each model call is "
        "split per job inside the grouped pipeline call. Off: one model call for the group "
        "(more throughput on GPUs; pixels may differ by one level).",
    )
    batch_window_s: float = Field(
        default=0.05, ge=0, le=5,
        description="How long the first job of a batch waits for compatible company.",
    )
    openpose_detector: bool = Field(
        default=False,
        description="Workers have controlnet-aux and its detector weights (GPU images), so "
        "openpose controls may be photos. Off: poses are keypoints or ready pose images.",
    )
    preprocess_timeout_s: float = Field(
        default=60, description="How long POST /v1/control/preprocess waits for a worker.")
    depth_model: str = Field(
        default="builtin:tiny-dpt",
        description="Depth estimator for ControlNet depth preprocessing: a hub id such as "
        "Intel/dpt-hybrid-midas (from the model cache), a directory, or builtin:tiny-dpt.",
    )


class TaggerSettings(BaseModel):
    """The captioning/tagging worker. Models load once per process, from the model cache."""

    captioner: str = Field(
        default="builtin:tiny-blip",
        description="A BLIP-class model: builtin:tiny-blip, a directory, or a hub id such as "
        "Salesforce/blip-image-captioning-large (in <model_cache>/hub unless downloads are on).")
    tagger: str = Field(
        default="builtin:tiny-wd14",
        description="A WD14-class tagger folder (model.onnx + selected_tags.csv), "
        "builtin:tiny-wd14, or a hub id such as SmilingWolf/wd-v1-4-convnext-tagger-v2.")
    device: str = Field(default="auto", description="auto, cpu, cuda")
    job_timeout_s: int = 3600
    max_tries: int = 3
    poll_delay_s: float = 0.05


class TrainerSettings(BaseModel):
    """The LoRA trainer worker."""

    device: str = Field(default="auto", description="auto, cpu, cuda")
    job_timeout_s: int = 6 * 3600
    max_tries: int = 3
    poll_delay_s: float = 0.05
    extra_optimizers: list[str] = Field(
        default_factory=list, description="Optimizers whose packages the trainer image has: "
        "AdamW8bit/Lion8bit (bitsandbytes), Lion (lion-pytorch), Prodigy (prodigyopt).")


class WorkerSettings(BaseModel):
    """What every worker (generator, tagger, trainer) shares: leases and Redis outages."""

    lease_s: float = Field(
        default=20, gt=0,
        description="A running job's claim lasts this long unless its worker renews it; a job "
        "whose worker died is re-delivered about this long after the death, whatever its "
        "timeout (arq's own claim is the job timeout + 10 s: 6 h for a training).",
    )
    lease_renew_s: float = Field(
        default=5, gt=0, description="How often a worker renews the leases of its jobs.")
    redis_retry_s: float = Field(
        default=30, ge=0,
        description="How long a worker's Redis commands wait for Redis to come back (a "
        "restart, a failover) before the worker's loop backs off on its own.",
    )

    @model_validator(mode="after")
    def _renew_well_within_the_lease(self) -> WorkerSettings:
        """A renewal that comes late, or a missed one, must not hand a live job to a peer."""
        if self.lease_renew_s * 2 > self.lease_s:
            raise ValueError("worker.lease_renew_s must be at most half of worker.lease_s")
        return self


# ≈ 3 days in all: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h.
DEFAULT_WEBHOOK_RETRY_SCHEDULE_S: list[float] = [0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]


class WebhookSettings(BaseModel):
    """Outbound webhooks: what the gateway may call, how long it keeps trying, what it keeps."""

    allow_http: bool = Field(default=False, description="Accept http:// webhook URLs; off: "
                             "https only.")
    allow_private_networks: bool = Field(
        default=False,
        description="Let webhooks reach loopback, private, link-local and cloud metadata "
        "addresses (tests, single-machine setups). Off in production: it is what stops SSRF.")
    timeout_s: float = Field(default=15, gt=0, description="A delivery attempt that takes "
                             "longer (connect and response) fails with a timeout.")
    retry_schedule_s: list[Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_RETRY_SCHEDULE_S), min_length=1,
        description="Delay before each attempt, from the previous one; after the last the "
        "delivery is failed (redeliverable by hand). The default spans about three days.")
    retry_jitter: float = Field(default=0.1, ge=0, le=1, description="Each delay is scaled by "
                                "a random factor within ±this fraction, so retries spread out.")
    progress_interval_s: float = Field(default=2.0, ge=0, description="At most one progress "
                                       "webhook per endpoint per job in this interval.")
    # SigV4 query signatures are valid for at most 7 days; local-store links have no ceiling.
    url_ttl_s: int = Field(default=86_400, gt=0, le=604_800, description="Lifetime of the "
                           "presigned artifact URLs in a payload, from when it is sent.")
    max_request_bytes: int = Field(default=256 * 1024, gt=0, description="Largest request "
                                   "body a delivery may send.")
    max_response_bytes: int = Field(default=64 * 1024, ge=1024, description="Most of a "
                                    "receiver's response read; its first KiB is logged.")
    disable_after_s: float = Field(default=5 * 86_400, gt=0, description="An endpoint whose "
                                   "every delivery failed for this long is disabled.")
    secret_overlap_s: float = Field(default=86_400, ge=0, description="After a secret "
                                    "rotation the old secret keeps signing this long.")
    dispatch_interval_s: float = Field(default=1.0, gt=0, description="How often a gateway "
                                       "looks for deliveries that are due.")
    dispatch_batch: int = Field(default=50, ge=1, description="Deliveries a gateway takes "
                                "per look.")


class CompatSettings(BaseModel):
    """The OpenAI Images and AUTOMATIC1111 API adapters (``LOOMIS_COMPAT__*``)."""

    wait_s: float = Field(default=300, gt=0, description="How long an adapter waits for its "
                          "job; then a 504 names the job, which keeps running.")
    openai_models: dict[str, str] = Field(default_factory=lambda: {
        "dall-e-2": "sd15", "dall-e-3": "sdxl", "gpt-image-1": "sdxl", "gpt-image-1-mini": "sd15"},
        description="OpenAI model names -> Loomis presets; a preset's own name works too.")
    edit_strength: float = Field(default=0.75, gt=0, le=1, description="OpenAI edits with no "
                                 "mask and no transparency: img2img at this strength.")
    variation_strength: float = Field(default=0.6, gt=0, le=1, description="OpenAI variations: "
                                      "img2img at this strength.")
    variation_prompt: str = Field(default="", max_length=2000, description="OpenAI variations' "
                                  "prompt (empty: the image alone guides).")
    a1111_open: bool = Field(default=False, description="AUTOMATIC1111 routes without "
                             "credentials act as `a1111_tenant` (local tools only).")
    a1111_tenant: str | None = Field(default=None, description="The tenant `a1111_open` implies.")


class Settings(BaseSettings):
    """All of Loomis' configuration; each service reads the part it needs."""

    model_config = SettingsConfigDict(
        env_prefix="LOOMIS_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = Path(".loomis")
    log_level: str = "INFO"
    log_json: bool = False

    db: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    storage: StorageSettings = StorageSettings()
    gateway: GatewaySettings = GatewaySettings()
    models: ModelSettings = ModelSettings()
    generator: GeneratorSettings = GeneratorSettings()
    tagger: TaggerSettings = TaggerSettings()
    trainer: TrainerSettings = TrainerSettings()
    worker: WorkerSettings = WorkerSettings()
    webhooks: WebhookSettings = WebhookSettings()
    compat: CompatSettings = CompatSettings()

    @model_validator(mode="before")
    @classmethod
    def _read_legacy_model_settings(cls, data: Any) -> Any:
        """Existing deployments set LOOMIS_GENERATOR__MODEL_CACHE and friends; keep them working."""
        if not isinstance(data, dict) or not isinstance(data.get("generator"), dict):
            return data
        generator = data["generator"]
        legacy = {new: generator[old] for old, new in LEGACY_GENERATOR_MODEL_FIELDS.items()
                  if old in generator}
        if not legacy:
            return data
        models = data.get("models")
        if isinstance(models, BaseModel):
            models = models.model_dump(exclude_unset=True)
        return {
            **data,
            "generator": {key: value for key, value in generator.items()
                          if key not in LEGACY_GENERATOR_MODEL_FIELDS},
            "models": {**legacy, **(models or {})},
        }

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        """A production gateway signing links with a published secret would let anyone forge them."""
        if self.env == "production" and (
            self.gateway.signing_secret.get_secret_value() == DEV_SIGNING_SECRET
        ):
            raise ValueError("LOOMIS_GATEWAY__SIGNING_SECRET must be set outside development")
        return self

    @property
    def database_url(self) -> str:
        if self.db.url:
            return self.db.url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'loomis.db').resolve()}"

    @property
    def storage_root(self) -> Path:
        return (self.storage.local_root or self.data_dir / "objects").resolve()

    @property
    def model_cache(self) -> Path:
        return (self.models.cache_dir or self.data_dir / "models").resolve()

    @property
    def public_url(self) -> str:
        return (self.gateway.public_url or f"http://{self.gateway.host}:{self.gateway.port}").rstrip(
            "/"
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()
