"""Application factory and lifespan: settings → model → patches and tenants → engine, on ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import torch
from fastapi import FastAPI

from patches.basemodel import DEFAULT_MODEL_NAME, prepare_default_model
from patches.fingerprint import model_spec
from patches.registry import PatchRegistry
from patches.rollback import VersionLedger
from patches.signing import Verifier
from patches.tenants import hash_api_key, load_tenants
from patches.toxicity import default_scorer
from patches.trust import Revocations, TrustStore
from server.admin import AdminService
from server.control import ControlPlane
from server.engine import TUNABLES, Engine, EngineConfig, VllmEngine
from server.errors import install_handlers
from server.limits import BodyLimitMiddleware
from server.metrics import Metrics, MetricsMiddleware
from server.overhead import OverheadSampler
from server.prompting import PromptEncoder
from server.routes import admin, chat, completions, health, metrics, models
from server.serving import CompletionService
from server.settings import Settings
from server.supervisor import Supervisor
from server.tenancy import TenantResolver
from server.toxicity_meter import ToxicityMeter
from server.watcher import PatchWatcher

log = logging.getLogger(__name__)

EngineFactory = Callable[[EngineConfig], Awaitable[Engine]]


def _model_dir(settings: Settings) -> tuple[Path, str]:
    if settings.model is None:
        return prepare_default_model(settings.cache_dir), settings.served_model_name or DEFAULT_MODEL_NAME
    if not (settings.model / "config.json").is_file():
        raise FileNotFoundError(f"PATCHSERVE_MODEL={settings.model} is not a model directory (no config.json)")
    return settings.model, settings.served_model_name or settings.model.name


def _load_patches_and_tenants(app: FastAPI, settings: Settings, model_dir: Path) -> None:
    spec = model_spec(model_dir, max_rows=settings.max_patch_tokens, dtype=settings.dtype)
    trust = TrustStore.load(settings.trust_dir) if settings.trust_dir else TrustStore()
    verifier = Verifier(trust, Revocations.load(settings.revocations_file), allow_unsigned=settings.allow_unsigned)
    settings.patch_dir.mkdir(parents=True, exist_ok=True)
    ledger = VersionLedger(settings.state_dir / "versions.json")  # refuses a corrupt file: never a silent reset
    registry = PatchRegistry(partial(verifier.verify, expect=spec), ledger)
    tenants = load_tenants(settings.tenants_file)
    encoder = PromptEncoder(model_dir, settings.separator)
    resolver = TenantResolver(
        tenants, registry, separator_id=encoder.separator_id, dtype=getattr(torch, settings.dtype)
    )
    admin_token = settings.admin_token
    control = ControlPlane(
        registry,
        resolver,
        patch_dir=settings.patch_dir,
        tenants_file=settings.tenants_file,
        verifier=verifier,
        revocations_file=settings.revocations_file,
        admin_key_hash=hash_api_key(admin_token.get_secret_value()) if admin_token is not None else None,
        dev_mode=settings.dev_mode,
    )
    control.check_tenants(tenants, at_start=True)
    registry.pinned = resolver.pinned
    registry.listeners.append(app.state.metrics)
    app.state.metrics.watch_registry(lambda: [entry.patch for entry in registry.entries()])
    control.load_all()
    state = app.state
    state.spec, state.registry, state.encoder, state.resolver = spec, registry, encoder, resolver
    state.control, state.watcher, state.admin = control, PatchWatcher(control), AdminService(control)


def _start_background(app: FastAPI, settings: Settings) -> None:
    supervisor: Supervisor = app.state.supervisor
    control: ControlPlane = app.state.control
    if settings.watch:
        supervisor.run("watcher", lambda: app.state.watcher.run(app.state.stop, polling=settings.watch_polling))
    supervisor.every("state-sync", settings.state_sync_seconds, lambda: asyncio.to_thread(control.sync_state))


async def _start(app: FastAPI, engine_factory: EngineFactory) -> None:
    settings: Settings = app.state.settings
    try:
        model_dir, name = await asyncio.to_thread(_model_dir, settings)
        app.state.model_name = name
        await asyncio.to_thread(_load_patches_and_tenants, app, settings, model_dir)
        _start_background(app, settings)
        config = EngineConfig(
            model_dir=model_dir,
            served_model_name=name,
            **settings.model_dump(include=set(TUNABLES)),
            extra_args=dict(settings.engine_args),
        )
        engine = app.state.engine = await engine_factory(config)
        app.state.sampler = OverheadSampler(
            engine,
            app.state.metrics,
            rate=settings.overhead_sample_rate,
            window=settings.overhead_window,
            max_tokens=settings.overhead_max_tokens,
        )
        meter = None
        if settings.toxicity_metrics:
            meter = ToxicityMeter(app.state.metrics, default_scorer())
            app.state.supervisor.run("toxicity", lambda: meter.run(app.state.stop))
        app.state.service = CompletionService(
            engine, app.state.encoder, name, app.state.metrics, app.state.sampler, app.state.resolver, meter
        )
        log.info("patchserve ready: model %s, %d patch versions loaded", name, len(app.state.registry.entries()))
    except Exception as exc:
        log.exception("start-up failed")
        app.state.startup_error = f"start-up failed: {type(exc).__name__}: {exc}"


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.stop = asyncio.Event()
    app.state.supervisor = Supervisor(app.state.metrics, app.state.stop)
    task = asyncio.create_task(_start(app, app.state.engine_factory))
    try:
        yield
    finally:
        app.state.stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await app.state.supervisor.close()
        if app.state.sampler is not None:
            await app.state.sampler.close()
        if app.state.engine is not None:
            await app.state.engine.shutdown()


def create_app(settings: Settings | None = None, engine_factory: EngineFactory | None = None) -> FastAPI:
    """Build the app. Start-up work (model, patches, engine) runs in the background after the lifespan
    starts, so ``/healthz`` answers at once and ``/readyz`` turns 200 when everything is loaded.

    Args:
        settings: Defaults to ``Settings()`` (environment and config file).
        engine_factory: Starts the engine; defaults to :meth:`VllmEngine.start` (tests pass a fake).
    """
    app = FastAPI(title="patchserve", version="0.1.0", lifespan=_lifespan)
    state = app.state
    state.settings = settings or Settings()
    state.engine_factory = engine_factory or VllmEngine.start
    state.model_name = state.settings.served_model_name or DEFAULT_MODEL_NAME
    state.engine = state.service = state.resolver = state.registry = state.admin = state.control = None
    state.supervisor = None
    state.sampler = state.startup_error = None
    state.metrics = Metrics(max_stacks=state.settings.metrics_max_stacks)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    install_handlers(app)
    for module in (chat, completions, models, health, metrics, admin):
        app.include_router(module.router)
    return app
