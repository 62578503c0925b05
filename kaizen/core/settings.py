"""Kaizen's one source of settings.

Every knob is read here, from the environment (prefix ``KAIZEN_``) or a
``.env`` file, once per process (:func:`get_settings`). CLI options override
fields by building a copy (``settings.model_copy(update=...)``); no other
module reads the environment for Kaizen settings.

    kaizen config            # the effective settings, secrets masked
    KAIZEN_PORT=9000 kaizen serve

The fields are declared, with their defaults, limits and what each is for, in
groups by area that `Settings` inherits: kaizen/core/settings_serving.py (data
dir, chat API, hardening, vLLM engine, supervisor), kaizen/core/settings_storage.py
(Kafka, outbox, retention, shared store), kaizen/core/settings_training.py
(trainer, reward model, torchrun, PPO/RLOO, disk), kaizen/core/settings_gate.py
(when rounds start, the gate) and kaizen/core/settings_rollout.py (registry, canary).
This module holds the one class and what is derived from the fields together.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic_settings import SettingsConfigDict

from kaizen.core.hardware import DtypeChoice, choose_dtype
from kaizen.core.settings_gate import RoundGateSettings
from kaizen.core.settings_rollout import RolloutSettings
from kaizen.core.settings_serving import EngineSettings, ServingSettings, SupervisorSettings
from kaizen.core.settings_storage import KafkaSettings, StoreSettings
from kaizen.core.settings_training import RoundUpkeepSettings, TrainingSettings

#: Name of the prepared default model's folder under ``<data_dir>/models``.
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


# pydantic orders the fields (and runs the validators) base by base from the last base listed to the
# first: the groups are listed last-first so `kaizen config` and `model_dump()` keep the order in which
# the areas are introduced, serving first.
class Settings(SupervisorSettings, RoundUpkeepSettings, RolloutSettings, RoundGateSettings, TrainingSettings,
               StoreSettings, KafkaSettings, EngineSettings, ServingSettings):
    """Effective configuration of every Kaizen process."""

    model_config = SettingsConfigDict(
        env_prefix="KAIZEN_", env_file=".env", extra="ignore", validate_default=True
    )

    # -- derived paths -------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def default_model_dir(self) -> Path:
        return self.models_dir / DEFAULT_MODEL_NAME

    @property
    def model_dir(self) -> Path:
        """The folder the chat API serves."""
        return self.model if self.model is not None else self.default_model_dir

    @property
    def registry_path(self) -> Path:
        """The model registry (versions, stages, audit log)."""
        return self.registry_dir if self.registry_dir is not None else self.data_dir / "registry"

    @property
    def trainer_data_path(self) -> Path:
        """Where the trainer's round log and schedule are, as the chat API sees them."""
        return self.trainer_data_dir if self.trainer_data_dir is not None else self.data_dir

    @property
    def api_db(self) -> Path:
        """The chat API's own store: comparisons and the vote outbox."""
        return self.data_dir / "api.sqlite"

    @property
    def preferences_db(self) -> Path:
        return self.data_dir / "preferences.sqlite"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def admin_token_path(self) -> Path:
        """Where a development server on loopback keeps its generated admin token (services/auth.py)."""
        return self.data_dir / "admin.token"

    @property
    def public_url(self) -> str:
        host = "127.0.0.1" if self.host in {"0.0.0.0", "::"} else self.host
        return f"http://{host}:{self.port}"

    @property
    def binds_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def masked(self) -> dict[str, Any]:
        """Settings as plain JSON-able values, secrets replaced by `**********`."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                out[name] = "**********"
            elif isinstance(value, list) and value and isinstance(value[0], SecretStr):
                out[name] = ["**********"] * len(value)
            elif isinstance(value, Path | timedelta):
                out[name] = str(value)
            else:
                out[name] = value
        out["model_dir (effective)"] = str(self.model_dir)
        out.update({f"{name} (effective)": str(choice) for name, choice in self.effective_dtypes().items()})
        from kaizen.core.engine_config import reserved_cpus, usable_cpus

        reserved = reserved_cpus(self)
        out["engine_reserved_cpus (effective)"] = (
            f"{'vLLM default' if reserved is None else reserved} ({usable_cpus()} usable cores)")
        out["kafka (effective)"] = (
            f"embedded broker at {self.bootstrap_servers}"
            if self.embedded_broker
            else f"external cluster at {self.bootstrap_servers}"
        )
        if self.database_url is None:
            out["database (effective)"] = f"SQLite at {self.api_db} (one API process)"
        else:
            from sqlalchemy.engine import make_url

            shared = make_url(self.database_url.get_secret_value()).render_as_string(hide_password=True)
            out["database (effective)"] = f"shared by the API replicas: {shared}"
        return out

    def effective_dtypes(self) -> dict[str, DtypeChoice]:
        """What each `*_dtype` setting resolves to on this machine (kaizen.core.hardware)."""
        return {"engine_dtype": choose_dtype(self.engine_dtype, serving=True),
                "reward_dtype": choose_dtype(self.reward_dtype), "ppo_dtype": choose_dtype(self.ppo_dtype)}

    def child_env(self) -> dict[str, str]:
        """Environment for a child process that must see these same settings."""
        env = dict(os.environ)
        for name, value in self.model_dump().items():
            key = f"KAIZEN_{name.upper()}"
            if value is None:
                env.pop(key, None)
            elif isinstance(value, SecretStr):
                env[key] = value.get_secret_value()
            elif isinstance(value, list):
                env[key] = ",".join(
                    v.get_secret_value() if isinstance(v, SecretStr) else str(v) for v in value
                )
            elif isinstance(value, bool):
                env[key] = "true" if value else "false"
            elif isinstance(value, timedelta):
                # ISO 8601, which pydantic parses; fixed-point (%g wrote 30 days as PT2.592e+06S, refused)
                seconds = f"{value.total_seconds():.6f}".rstrip("0").rstrip(".")
                env[key] = f"PT{seconds}S"
            else:
                env[key] = str(value)
        return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, built once from the environment."""
    return Settings()
