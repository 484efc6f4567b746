"""The gateway on Ray: the same Starlette app as a Ray Serve ingress deployment of N replicas
behind Serve's HTTP proxy, with API-key budgets kept exact across every replica.

    run_gateway(fleet_settings, server_settings, replicas=2)   # then Serve's proxy answers

Budgets stay exact because one process owns them: a `KeyLedger` actor holds the keys file (as
one `shoal serve` does, with its lock) and every replica takes its holds there, one call at a
time in the actor's order; the replicas never keep a budget of their own. A hold is taken before
a call starts (the replica waits for the actor's answer: well under a millisecond on one
machine) and settled when the call ends (sent without waiting: the actor runs one caller's
calls in the order they were sent, so a hold is always settled after it is taken). Each replica
reads keys from the file to authenticate, and writes its calls' traces to the one trace store.

What is per replica: the Prometheus metrics (`/metrics` answers for whichever replica Serve
picks) and the pipeline runs a replica started (read them back through the same replica's
traces). A replica that dies with calls in flight leaves their holds on the ledger until it is
restarted.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.backends.ray_cluster import QUIET_LOGS, import_ray
from shoal.backends.ray_model import Failure
from shoal.errors import ShoalError
from shoal.ledger import Hold, to_pico
from shoal.server.keys import KeyState, KeyStore
from shoal.server.state import KEYS_FILE
from shoal.settings import FleetSettings, ServerSettings

log = logging.getLogger(__name__)

LEDGER = "shoal-key-ledger"
GATEWAY_APP = "shoal-gateway"


class KeyLedger:
    """The one owner of a keys file's budgets on a cluster (a Ray actor; one call at a time)."""

    def __init__(self, path: str) -> None:
        self.store = KeyStore(path, serving=True)
        self.holds: dict[int, Hold] = {}
        self.last = 0

    def admit(self, digest: str) -> Failure | None:
        try:
            self.store.admit(self.store.authenticate_hash(digest))
        except ShoalError as exc:
            return Failure.of(exc)
        return None

    def reserve(self, digest: str, usd: float) -> int | Failure:
        try:
            hold = self.store.reserve(self.store.authenticate_hash(digest), usd)
        except ShoalError as exc:
            return Failure.of(exc)
        self.last += 1
        self.holds[self.last] = hold
        return self.last

    def settle(self, hold_id: int, charged_pusd: int) -> None:
        hold = self.holds.pop(hold_id, None)
        if hold is not None:
            hold.settle(charged_pusd)

    def spent_pusd(self, name: str) -> tuple[int, int, int | None]:
        """(spent, held, budget) of the key named `name`, in picodollars."""
        self.store.flush()
        for state in self.store._live.values():
            if state.name == name:
                a = state.account
                return a.spent_pusd, a.held_pusd, a.limit_pusd
        record = self.store.record(name)
        if record is None:
            raise KeyError(name)
        budget = None if record.budget_usd is None else to_pico(record.budget_usd)
        return to_pico(record.spent_usd), 0, budget

    def overrun_pusd(self) -> int:
        return self.store.overrun_pusd

    def close(self) -> None:
        self.store.close()


@dataclass
class SharedHold(Hold):
    """A hold taken on the ledger actor; settling it there is sent without waiting."""

    ledger: Any = None
    hold_id: int = 0

    def settle(self, charged_pusd: int) -> int:
        if self.charged_pusd is not None:
            return self.charged_pusd
        self.charged_pusd = charged = max(0, charged_pusd)
        self.ledger.settle.remote(self.hold_id, charged)
        return charged


class SharedKeyStore(KeyStore):
    """A keys file read by a gateway replica: keys are authenticated here, from the file;
    rate limits and budgets are the ledger actor's."""

    def __init__(self, path: str | Path, ledger: Any) -> None:
        super().__init__(path, serving=False)
        self.ledger = ledger

    def _digest(self, key: KeyState) -> str:
        for digest, state in self._live.items():
            if state is key:
                return digest
        raise AssertionError("a key state this store did not hand out")

    def admit(self, key: KeyState) -> None:
        if key.rpm is not None:  # a key without a rate limit has nothing to ask
            self._admitted(import_ray().get(self.ledger.admit.remote(self._digest(key))))

    async def admit_async(self, key: KeyState) -> None:
        if key.rpm is not None:
            self._admitted(await self.ledger.admit.remote(self._digest(key)))

    def reserve(self, key: KeyState, worst_usd: float) -> Hold:
        answer = import_ray().get(self.ledger.reserve.remote(self._digest(key), worst_usd))
        return self._held(key, worst_usd, answer)

    async def reserve_async(self, key: KeyState, worst_usd: float) -> Hold:
        answer = await self.ledger.reserve.remote(self._digest(key), worst_usd)
        return self._held(key, worst_usd, answer)

    @staticmethod
    def _admitted(failure: Failure | None) -> None:
        if failure is not None:
            raise failure.error()

    def _held(self, key: KeyState, worst_usd: float, answer: int | Failure) -> Hold:
        if isinstance(answer, Failure):
            raise answer.error()
        return SharedHold(key.account, to_pico(worst_usd), ledger=self.ledger, hold_id=answer)

    @property
    def overrun_pusd(self) -> int:
        ray = import_ray()
        overrun = ray.get(self.ledger.overrun_pusd.remote())
        assert isinstance(overrun, int)
        return overrun


class Gateway:
    """One replica of the gateway: the fleet and the app built in this process (its models on
    Ray are found by name, deployed already by `run_gateway`)."""

    def __init__(
        self, fleet: FleetSettings, settings: ServerSettings, keys_path: str, trace_path: str
    ) -> None:
        from shoal.engine import Engine
        from shoal.fleet import Fleet
        from shoal.traces.background import DeferredTraceStore

        ray = import_ray()
        # Trace rows are committed in batches just after the responses, as `shoal serve` does:
        # the replicas share the file, and a commit on each call's path would queue them.
        self.engine = Engine(Fleet(fleet), traces=DeferredTraceStore(trace_path))
        self.settings = settings
        self.keys = SharedKeyStore(keys_path, ray.get_actor(LEDGER)) if settings.auth else None

    def __serve_build_asgi_app__(self) -> Any:
        from shoal.server.app import create_app

        return create_app(self.engine, self.settings, keys=self.keys, close_engine=True)


@dataclass(frozen=True)
class GatewayHandle:
    """What `run_gateway` started: the ledger actor (None without keys) and the Serve app."""

    ledger: Any
    app: str = GATEWAY_APP

    def stop(self) -> None:
        from ray import serve

        ray = import_ray()
        serve.delete(self.app)
        if self.ledger is not None:
            ray.get(self.ledger.close.remote())
            ray.kill(self.ledger)


def run_gateway(
    fleet: FleetSettings,
    settings: ServerSettings,
    *,
    replicas: int = 2,
    num_cpus: float = 0.5,
    max_ongoing_requests: int = 256,
    trace_path: str | Path | None = None,
) -> GatewayHandle:
    """Deploy the fleet's Ray models, the key ledger and `replicas` gateway replicas, on the
    cluster this process joined (`shoal.backends.ray_cluster.connect`), behind Serve's proxy
    (`serve.start(http_options=...)` says where it listens). Returns once they all answer."""
    ray = import_ray()
    from ray import serve

    from shoal.backends.ray_model import RayModel
    from shoal.engine import TRACES_FILE
    from shoal.fleet import Fleet

    here = Fleet(fleet)
    for model_id in here.ids:
        if here.placement(model_id) is not None and here.installed(model_id):
            model = here.model(model_id)
            assert isinstance(model, RayModel)
            model.handle()
    keys_path = str(settings.keys_path or here.cache_dir / KEYS_FILE)
    traces = str(trace_path or here.cache_dir / TRACES_FILE)
    ledger = None
    if settings.auth:
        ledger = (
            ray.remote(KeyLedger).options(name=LEDGER, num_cpus=0, max_restarts=0).remote(keys_path)
        )
        ray.get(ledger.overrun_pusd.remote())  # the file is open and locked
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    deployment: Any = serve.deployment(serve.ingress()(Gateway))
    bound = deployment.options(
        name="gateway",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=max_ongoing_requests,
        logging_config=QUIET_LOGS,
    ).bind(fleet, settings, keys_path, traces)
    serve.run(bound, name=GATEWAY_APP, route_prefix="/")
    return GatewayHandle(ledger)
