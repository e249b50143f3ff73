"""What `ansible-playbook playbooks/site.yml` would write on each host, without hosts.

The inventory, group_vars, role defaults, the vault file and site.yml's plays are
loaded by ansible-core's own DataLoader, InventoryManager and VariableManager, and
every template task of every role is rendered by its own Templar with the template
action's settings, so variable precedence, filters and lazy templating are exactly
those of a real run. What only a host can supply is missing: facts are not gathered
(every use has a default) and set_fact results come from HOST_FACTS.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ansible import constants as ansible_constants
from ansible.errors import AnsibleError
from ansible.inventory.manager import InventoryManager
from ansible.module_utils.common.arg_spec import ArgumentSpecValidator
from ansible.parsing.dataloader import DataLoader
from ansible.playbook.block import Block
from ansible.playbook.play import Play
from ansible.playbook.task import Task
from ansible.plugins.loader import init_plugin_loader
from ansible.template import Templar, generate_ansible_template_vars, trust_as_template
from ansible.vars.hostvars import HostVars
from ansible.vars.manager import VariableManager

REPO = Path(__file__).resolve().parents[2]
SITE = REPO / "playbooks" / "site.yml"
ROLES = REPO / "roles"

TEMPLATE_ACTIONS = {"template", "ansible.builtin.template", "ansible.legacy.template"}
COPY_ACTIONS = {"copy", "ansible.builtin.copy", "ansible.legacy.copy"}
COMMAND_ACTIONS = {"command", "ansible.builtin.command", "ansible.legacy.command"}
INCLUDE_ROLE_ACTIONS = {"include_role", "ansible.builtin.include_role"}
ARGSPEC_ACTIONS = {"validate_argument_spec", "ansible.builtin.validate_argument_spec"}
# include_role of another role's task file whose templates are rendered here: common's
# env.yml writes every env file of the fleet.
RENDERED_INCLUDES = {("common", "env"), ("common", "env.yml")}
# The template action's Jinja settings when a task does not change them.
TEMPLATE_OVERRIDES = {"trim_blocks": True, "lstrip_blocks": False, "newline_sequence": "\n"}
TEMPLATE_JINJA_ARGS = {
    *TEMPLATE_OVERRIDES,
    *(
        f"{kind}_{end}_string"
        for kind in ("block", "variable", "comment")
        for end in ("start", "end")
    ),
}
# set_fact results the roles compute on the host from what they find there. The
# PostgreSQL major version only names the directory pg_hba.conf goes to; 15 is
# Debian bookworm's, the platform the roles' meta names.
HOST_FACTS: Mapping[str, Any] = {"orchestrator_pg_version": "15"}


@dataclass(frozen=True)
class RenderedFile:
    host: str
    role: str
    src: Path  # the .j2 in the repository
    dest: str  # where the task writes it on the host
    text: str


@dataclass(frozen=True)
class Command:
    """An ansible.builtin.command task with argv, as the host would run it."""

    role: str
    name: str
    argv: tuple[str, ...]
    runs: bool | None  # its `when`; None: it depends on results of earlier tasks


@dataclass
class HostConfig:
    name: str
    groups: tuple[str, ...]
    roles: list[str] = field(default_factory=list)
    files: dict[str, RenderedFile] = field(default_factory=dict)  # by dest
    copied: set[str] = field(default_factory=set)  # dests of copy tasks (keys, certificates)
    commands: list[Command] = field(default_factory=list)
    # Each virtualenv the roles deploy (common's code.yml): root -> pip extras.
    code_roots: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Role variables the roles' argument specs reject, as validate_argument_spec says.
    argument_errors: list[str] = field(default_factory=list)
    # Each role's variables as its tasks see them (untemplated, as Ansible keeps them).
    role_variables: dict[str, dict[str, Any]] = field(default_factory=dict)
    loader: DataLoader = field(default_factory=DataLoader)

    def var(self, role: str, name: str) -> Any:
        """A variable as the tasks of ``role`` on this host would read it."""
        variables = self.role_variables[role]
        return Templar(loader=self.loader, variables=variables).template(variables[name])


def _tasks(blocks: list[Any]) -> Iterator[Task]:
    for block in blocks:
        if isinstance(block, Block):
            yield from _tasks(block.block)
            yield from _tasks(block.rescue)
            yield from _tasks(block.always)
        else:
            yield block


def _condition(templar: Templar, task: Task) -> bool | None:
    try:
        return all(templar.evaluate_conditional(c) for c in task.when)
    except AnsibleError:
        return None  # names a registered result: only a run can tell


def _iterations(loader: DataLoader, task: Task, task_vars: dict[str, Any]) -> Iterator[Templar]:
    """One templar per loop item (or one without a loop), as the task executor builds them."""
    if not task.loop:
        yield Templar(loader=loader, variables=task_vars)
        return
    assert not task.loop_with, f"{task.get_name()}: with_* loops are not rendered here"
    loop_var = task.loop_control.loop_var if task.loop_control else "item"
    for item in Templar(loader=loader, variables=task_vars).template(task.loop):
        yield Templar(loader=loader, variables={**task_vars, loop_var: item})


def _render_template(
    loader: DataLoader, role_path: Path, task: Task, templar: Templar, host: str, role: str
) -> RenderedFile:
    dest = templar.template(task.args["dest"])
    src = role_path / "templates" / templar.template(task.args["src"])
    # A task's own delimiters (variable_start_string and the like), as the template
    # action applies them: e.g. the alert rules, whose {{ $labels }} are Prometheus's.
    overrides = {
        **TEMPLATE_OVERRIDES,
        **{k: templar.template(v) for k, v in task.args.items() if k in TEMPLATE_JINJA_ARGS},
    }
    variables = {
        **templar.available_variables,
        **generate_ansible_template_vars(path=task.args["src"], fullpath=str(src), dest_path=dest),
    }
    data = trust_as_template(loader.get_text_file_contents(str(src)))
    text = Templar(loader=loader, variables=variables).template(
        data, escape_backslashes=False, overrides=overrides
    )
    return RenderedFile(host=host, role=role, src=src, dest=dest, text=text or "")


def _validate_arguments(task: Task, templar: Templar, task_vars: dict[str, Any]) -> list[str]:
    spec = task.args["argument_spec"]
    provided = templar.template({name: task_vars[name] for name in spec if name in task_vars})
    result = ArgumentSpecValidator(spec).validate(provided, validate_role_argument_spec=True)
    return list(result.error_messages)


def _play_data(loader: DataLoader, playbook: Path, vault: Path) -> Iterator[dict[str, Any]]:
    for data in loader.load_from_file(str(playbook)):
        if "roles" not in data:
            continue  # import_playbook and the like: no role templates there
        # The vault comes from the inventory's group_vars (group_vars/all/vault.yml),
        # never from a play; the example vault stands in for it, as a play's vars.
        assert "vars_files" not in data, f"{playbook}: {data.get('name')}"
        roles = data["roles"]
        if str(ROLES) not in ansible_constants.DEFAULT_ROLES_PATH:
            # ansible.cfg (roles_path) applies when run from the repository root;
            # from elsewhere the same roles are named by path.
            roles = [str(ROLES / r) if isinstance(r, str) else r for r in roles]
        yield {**data, "vars_files": [str(vault)], "roles": roles}


def render_site(inventory: Path, vault: Path, playbook: Path = SITE) -> dict[str, HostConfig]:
    """Every host of ``inventory`` with what site.yml's roles would write there."""
    init_plugin_loader()
    loader = DataLoader()
    loader.set_basedir(str(playbook.parent))
    inv = InventoryManager(loader=loader, sources=[str(inventory)])
    variables = VariableManager(loader=loader, inventory=inv)
    HostVars(inventory=inv, variable_manager=variables, loader=loader)  # `hostvars`
    hosts = {
        h.name: HostConfig(h.name, tuple(g.name for g in h.get_groups()), loader=loader)
        for h in inv.get_hosts()
    }
    for data in _play_data(loader, playbook, vault):
        play = Play.load(data, variable_manager=variables, loader=loader)
        for host in inv.get_hosts(play.hosts):
            config = hosts[host.name]
            for role in play.get_roles():
                role_name = Path(role.get_name()).name
                config.roles.append(role_name)
                for task in _tasks(role.compile(play=play)):
                    task_vars = {
                        **variables.get_vars(play=play, host=host, task=task),
                        **HOST_FACTS,
                    }
                    config.role_variables.setdefault(role_name, task_vars)
                    _run(loader, config, Path(role.get_role_path()), role_name, task, task_vars)
    return hosts


def _run(
    loader: DataLoader,
    config: HostConfig,
    role_path: Path,
    role: str,
    task: Task,
    task_vars: dict[str, Any],
) -> None:
    """Do, on paper, what ``task`` would do on the host that matters here."""
    if task.action in ARGSPEC_ACTIONS:
        templar = Templar(loader=loader, variables=task_vars)
        errors = _validate_arguments(task, templar, task_vars)
        config.argument_errors += [f"role {role}: {e}" for e in errors]
    elif task.action in INCLUDE_ROLE_ACTIONS and (
        task.args.get("name"),
        task.args.get("tasks_from"),
    ) in {("common", "code"), ("common", "code.yml")}:
        templar = Templar(loader=loader, variables=task_vars)
        root = templar.template(task_vars["common_code_root"])
        extras = str(templar.template(task_vars["common_code_extras"]))
        config.code_roots[root] = tuple(e for e in extras.split(",") if e)
    elif (
        task.action in INCLUDE_ROLE_ACTIONS
        and (task.args.get("name"), task.args.get("tasks_from")) in RENDERED_INCLUDES
    ):
        _render_included(loader, config, role, task, task_vars)
    elif task.action in TEMPLATE_ACTIONS:
        for templar in _iterations(loader, task, task_vars):
            if _condition(templar, task) is not False:
                f = _render_template(loader, role_path, task, templar, config.name, role)
                config.files[f.dest] = f
    elif task.action in COPY_ACTIONS:
        for templar in _iterations(loader, task, task_vars):
            if _condition(templar, task) is not False:
                config.copied.add(templar.template(task.args["dest"]))
    elif task.action in COMMAND_ACTIONS and "argv" in task.args:
        for templar in _iterations(loader, task, task_vars):
            argv = tuple(str(a) for a in templar.template(task.args["argv"]))
            config.commands.append(Command(role, task.get_name(), argv, _condition(templar, task)))


def _render_included(
    loader: DataLoader, config: HostConfig, role: str, task: Task, task_vars: dict[str, Any]
) -> None:
    """The template tasks of an included role's task file, as include_role runs them:
    that role's defaults below the caller's variables and the include's own vars."""
    role_path = ROLES / task.args["name"]
    tasks_file = role_path / "tasks" / f"{Path(task.args['tasks_from']).stem}.yml"
    defaults = loader.load_from_file(
        str(role_path / "defaults" / "main.yml"), trusted_as_template=True
    )
    variables = {**defaults, **task_vars}
    for data in loader.load_from_file(str(tasks_file), trusted_as_template=True):
        included = Task.load(data, loader=loader)
        if included.action in TEMPLATE_ACTIONS:
            templar = Templar(loader=loader, variables=variables)
            f = _render_template(loader, role_path, included, templar, config.name, role)
            config.files[f.dest] = f
