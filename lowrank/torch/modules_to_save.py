"""Modules trained in full next to a LoRA adapter and saved with it: PEFT's `modules_to_save`.

LoRA (Hu et al. 2021, arXiv:2106.09685) trains low-rank updates of frozen layers. A layer that
is new, like the randomly initialised head of a classifier, has nothing to adapt: it trains in
full, and must be saved with the adapter, or a reloaded model gets a random head. PEFT keeps
such a module in a `ModulesToSaveWrapper` (peft/utils/other.py); lowrank's has the same layout,
so parameter names, adapter files and behaviour agree:

    classifier                       ModulesToSaveWrapper
      original_module                the module as it was, frozen
      modules_to_save.<adapter>      one trainable copy per adapter (a deep copy of the original)

Forward runs the active adapter's copy, and the original while adapters are disabled or when
the active adapter has no copy here. In an adapter file the copy's tensors (its state dict:
parameters and persistent buffers) are stored under the module's own name,
`base_model.model.<module path>.<tensor>` (e.g. base_model.model.classifier.weight: PEFT's
save_and_load.py drops `modules_to_save.<adapter>.` on saving and puts it back on loading),
and adapter_config.json lists the module paths under "modules_to_save".

Two rules select modules from a list of entries: `add_lora(..., modules_to_save=[...])` uses
lowrank's target rule (an exact name or a dotted suffix, and every entry must select
something: `model.matches`); a file is read with PEFT's rule (`peft_selects`: the end of the
name, as str.endswith, entries that select nothing allowed), so that it selects in lowrank
what it selects in PEFT. Where the two differ (entry "0" also ends "10"), `peft_format` refuses
to write a file that PEFT would read differently.

`add_lora` wraps (`stage_copies`, then `install_copies`), `peft_format` saves
(`modules_to_save_state_dict`), `peft_load` loads; `adapters.py` switches, disables and deletes
the copies with the LoRA factors.
"""

import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lowrank.torch.lora import LoRALayer

__all__ = [
    "ModulesToSaveWrapper",
    "saved_modules",
    "module_names",
    "peft_selects",
    "select_modules",
    "stage_copies",
    "install_copies",
    "modules_to_save_state_dict",
]

# Containers without a forward of their own cannot stand in for a module (PEFT refuses them too).
_CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


class ModulesToSaveWrapper(nn.Module):
    """A frozen module plus one trainable copy of it per adapter (PEFT's wrapper, same names).

    Attributes:
        original_module: the module as it was; frozen.
        modules_to_save: nn.ModuleDict of each adapter's copy.
        active_adapter: the adapter whose copy forward runs (None: the original runs).
        disabled: True while adapters are disabled (`adapters.disable_adapters`).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from lowrank.torch.modules_to_save import ModulesToSaveWrapper
        >>> _ = torch.manual_seed(0)
        >>> head = ModulesToSaveWrapper(nn.Linear(4, 2))
        >>> head.add_adapter("default")
        >>> head.active_adapter = "default"
        >>> _ = head.modules_to_save["default"].weight.data.add_(1.0)  # as if trained
        >>> x = torch.randn(3, 4)  # (batch, in)
        >>> torch.equal(head(x), head.modules_to_save["default"](x)), head(x).shape
        (True, torch.Size([3, 2]))
        >>> head.disabled = True  # the original module again
        >>> torch.equal(head(x), head.original_module(x))
        True
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.train(original_module.training)

    def add_adapter(self, name: str, module: nn.Module | None = None) -> None:
        """Keep `module` (default: a deep copy of the original) as adapter `name`'s copy."""
        if name in self.modules_to_save:
            raise ValueError(f"this module already keeps a copy for adapter {name!r}")
        if module is None:
            module = copy.deepcopy(self.original_module)
        self.modules_to_save[name] = module

    def delete_adapter(self, name: str) -> None:
        """Drop adapter `name`'s copy; none is active if it was."""
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @property
    def active_module(self) -> nn.Module:
        """The module forward runs: the active adapter's copy, else the original."""
        name = self.active_adapter
        if self.disabled or name not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[name]

    def forward(self, *args, **kwargs):
        """The active module's forward, with the same arguments and output."""
        return self.active_module(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"copies={list(self.modules_to_save)}, active={self.active_adapter!r}"


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    """(qualified name, wrapper) for every `ModulesToSaveWrapper` in `model`.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.modules_to_save import saved_modules
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), head=nn.Linear(8, 2)))
        >>> _ = add_lora(model, ["q"], r=2, modules_to_save=["head"])
        >>> [(name, list(wrapper.modules_to_save)) for name, wrapper in saved_modules(model)]
        [('head', ['default'])]
    """
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


def module_names(model: nn.Module) -> list[str]:
    """Names of the modules an entry can select, in model order: every module but the model
    itself and the insides of LoRA layers and of wrappers (a wrapper is named itself).

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.modules_to_save import module_names
        >>> head = nn.Sequential(OrderedDict(dense=nn.Linear(8, 8), out=nn.Linear(8, 2)))
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), head=head))
        >>> module_names(add_lora(model, ["q"], r=2))
        ['q', 'head', 'head.dense', 'head.out']
    """
    names, inside = [], None
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        names.append(name)
        if isinstance(module, LoRALayer | ModulesToSaveWrapper):
            inside = name + "."
    return names


def peft_selects(name: str, entry: str) -> bool:
    """PEFT's rule for a modules_to_save entry read from a file: the name ends with it
    (str.endswith, not at a dot: "0" selects "10" too).

    Examples:
        >>> from lowrank.torch.modules_to_save import peft_selects
        >>> peft_selects("classifier", "classifier"), peft_selects("10", "0")
        (True, True)
    """
    return name.endswith(entry)


def select_modules(
    model: nn.Module,
    entries: list[str],
    rule: Callable[[str, str], bool],
    *,
    every_entry_must_match: bool,
) -> list[str]:
    """The module names (`module_names`) that some entry selects by `rule(name, entry)`, in
    model order. ValueError for an entry that is not a non-empty str, for one that selects
    nothing when `every_entry_must_match`, and for a selected module inside another.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.model import matches
        >>> from lowrank.torch.modules_to_save import peft_selects, select_modules
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), classifier=nn.Linear(8, 2)))
        >>> select_modules(model, ["classifier", "score"], peft_selects,
        ...                every_entry_must_match=False)  # PEFT's SEQ_CLS default
        ['classifier']
        >>> select_modules(model, ["head"], matches, every_entry_must_match=True)
        Traceback (most recent call last):
            ...
        ValueError: modules_to_save entry 'head' selects no module; modules: q, classifier
    """
    if not isinstance(entries, list | tuple) or not all(isinstance(e, str) and e for e in entries):
        raise ValueError(f"modules_to_save must be a list of module names, got {entries!r}")
    names = module_names(model)
    chosen = []
    for entry in entries:
        hits = [n for n in names if rule(n, entry)]
        if every_entry_must_match and not hits:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(f"modules_to_save entry {entry!r} selects no module; modules: {shown}")
        chosen.extend(n for n in hits if n not in chosen)
    for name in chosen:
        outer = next((o for o in chosen if name.startswith(o + ".")), None)
        if outer is not None:
            raise ValueError(f"modules_to_save selects {name!r} inside {outer!r}; choose one")
    return [n for n in names if n in chosen]


def stage_copies(
    model: nn.Module, names: list[str], adapter_name: str, lora_names: list[str]
) -> list[tuple[str, ModulesToSaveWrapper | None, nn.Module]]:
    """Check each module and make adapter `adapter_name`'s copy of it, without changing the
    model: (name, its wrapper or None when it has none yet, the copy). A module to save
    must not be, hold or sit inside a LoRA layer (existing or in `lora_names`, about to be
    wrapped: PEFT leaves such layers out of the targets), nor be a container without forward.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.modules_to_save import stage_copies
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), head=nn.Linear(8, 2)))
        >>> [(name, wrapper, type(copy).__name__) for name, wrapper, copy in
        ...  stage_copies(model, ["head"], "default", lora_names=["q"])]
        [('head', None, 'Linear')]
        >>> type(model.head).__name__  # not installed yet
        'Linear'
        >>> stage_copies(model, ["q"], "default", lora_names=["q"])
        Traceback (most recent call last):
            ...
        ValueError: 'q' is a LoRA target and in modules_to_save; ...
    """
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALayer)] + list(lora_names)
    staged = []
    for name in names:
        module = model.get_submodule(name)
        clash = next((n for n in adapted if n == name or n.startswith(name + ".")), None)
        if clash is None:
            clash = next((n for n in adapted if name.startswith(n + ".")), None)
        if clash is not None:
            raise ValueError(
                f"{clash!r} is a LoRA target and in modules_to_save; a module trains in full "
                f"or through LoRA, not both (PEFT leaves such layers out of the targets)"
            )
        if isinstance(module, _CONTAINERS):
            raise ValueError(f"{name!r} is a {type(module).__name__}, which has no forward")
        wrapper = module if isinstance(module, ModulesToSaveWrapper) else None
        if wrapper is not None and adapter_name in wrapper.modules_to_save:
            raise ValueError(f"{name!r} already keeps a copy for adapter {adapter_name!r}")
        original = module if wrapper is None else wrapper.original_module
        staged.append((name, wrapper, copy.deepcopy(original)))
    return staged


def install_copies(
    model: nn.Module,
    staged: list[tuple[str, ModulesToSaveWrapper | None, nn.Module]],
    adapter_name: str,
    active: str | None,
) -> None:
    """Wrap the staged modules that have no wrapper yet (the original frozen) and give each
    wrapper its copy for `adapter_name`; every wrapper's active adapter becomes `active` (the
    model's). A copy trains when its adapter is active.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.modules_to_save import install_copies, stage_copies
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), head=nn.Linear(8, 2)))
        >>> install_copies(model, stage_copies(model, ["head"], "a", []), "a", active="a")
        >>> type(model.head).__name__, model.head.modules_to_save["a"].weight.requires_grad
        ('ModulesToSaveWrapper', True)
    """
    for name, wrapper, module_copy in staged:
        if wrapper is None:
            wrapper = ModulesToSaveWrapper(model.get_submodule(name).requires_grad_(False))
            parent, _, child = name.rpartition(".")  # model.replace_module, which imports this
            setattr(model.get_submodule(parent), child, wrapper)
        wrapper.add_adapter(adapter_name, module_copy)
        module_copy.requires_grad_(adapter_name == active)
    for _, wrapper in saved_modules(model):
        wrapper.active_adapter = active


def modules_to_save_state_dict(
    model: nn.Module, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """Adapter `adapter_name`'s copies, keyed `<module path>.<tensor>` (detached, on the CPU):
    the names PEFT gives them in a file, less PEFT's "base_model.model." prefix.

    Examples:
        >>> from collections import OrderedDict
        >>> from torch import nn
        >>> from lowrank.torch.model import add_lora
        >>> from lowrank.torch.modules_to_save import modules_to_save_state_dict
        >>> model = nn.Sequential(OrderedDict(q=nn.Linear(8, 8), head=nn.Linear(8, 2)))
        >>> _ = add_lora(model, ["q"], r=2, modules_to_save=["head"])
        >>> {key: tuple(t.shape) for key, t in modules_to_save_state_dict(model).items()}
        {'head.weight': (2, 8), 'head.bias': (2,)}
    """
    state = {}
    for name, wrapper in saved_modules(model):
        if adapter_name in wrapper.modules_to_save:
            for key, tensor in wrapper.modules_to_save[adapter_name].state_dict().items():
                state[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
    return state
