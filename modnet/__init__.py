"""modnet: continual and zero-shot learning on one modular network.

The Python API for researchers who write their own Avalanche scripts (imported lazily, so that ``modnet
--help`` and config checks stay fast):

    from modnet import HATMLP, HATCNN, Condition, build_modular_network, modnet_strategy
    from modnet import HATPlugin, ModulesPlugin, SyncRegPlugin, TaskKeysPlugin, ConditionedTemplate, ForwardLossTerm
    from modnet import UpdateTerm, UpdateTerms

``modnet_strategy(model, optimizer, **template_args)`` is the ``modnet`` strategy (an Avalanche
``SupervisedTemplate`` with the HAT plugin, and the modules', task-keys' and sync plugins where the network has
module gates, task keys, a sync regulariser).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "HATNet": "modnet.nets.models", "HATMLP": "modnet.nets.models", "HATCNN": "modnet.nets.models",
    "HATResNet18": "modnet.nets.models", "Condition": "modnet.nets.models", "ForwardTrace": "modnet.nets.models",
    "HATTraining": "modnet.nets.models",
    "ModularGating": "modnet.nets.modules", "ModuleGate": "modnet.nets.modules", "TaskKeys": "modnet.nets.modules",
    "build_modular_network": "modnet.nets.build", "build_baseline_network": "modnet.nets.build",
    "describe_network": "modnet.nets.record", "save_network": "modnet.nets.record",
    "load_network": "modnet.nets.record",
    "HATPlugin": "strategies.plugins.hat", "SyncRegPlugin": "strategies.plugins.modular",
    "TaskKeysPlugin": "strategies.plugins.modular", "ModulesPlugin": "strategies.plugins.modular",
    "ConditionedTemplate": "strategies.template",
    "ForwardLossTerm": "strategies.template",
    "UpdateTerm": "strategies.update", "UpdateTerms": "strategies.update",
    "modnet_strategy": "strategies.modnet",
    "NIWT": "modnet.methods.niwt", "SynC": "modnet.methods.sync",
    "run_experiences": "modnet.runner.runner", "make_strategy": "modnet.runner.runner",
}
__all__ = ["__version__", *_API]


def __dir__() -> list[str]:  # the lazily imported API too: tab completion and help() list it
    return sorted({*globals(), *_API})


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'modnet' has no attribute {name!r}")
