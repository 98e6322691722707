"""restore.stop and restore.start: a list for every live restore, or a mapping by component."""

from __future__ import annotations

import textwrap
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovbackupd import config, restore
from sovbackupd.config.models import STOP_ORDER, ComponentCommands, Policy
from sovbackupd.errors import ConfigError

APP_STOP = ["systemctl", "stop", "sovereigncore"]
REDIS_STOP = ["systemctl", "stop", "redis-server"]

argvs = st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=2)
mappings = st.builds(
    ComponentCommands,
    **{component: st.lists(argvs, max_size=3) for component in restore.COMPONENTS},
)
selections = st.sets(st.sampled_from(restore.COMPONENTS))


@settings(max_examples=300, deadline=None)
@given(mappings, selections, st.sampled_from(["stop", "start"]))
def test_a_mapping_runs_each_distinct_command_of_the_restored_components_once_in_order(
    commands: ComponentCommands,
    components: set[restore.Component],
    stage: Literal["stop", "start"],
) -> None:
    """Exactly the restored components' distinct argvs run, once each, in the documented order.

    Invariant: for stop the components go data, config, sqlite, redis (start: the
    reverse), each argv at its first place in that walk; a component not restored adds
    nothing, so an --only sqlite restore never runs Redis's stop.
    """
    chosen = restore.service_commands(commands, components, stage)

    order = STOP_ORDER if stage == "stop" else STOP_ORDER[::-1]
    walk = [
        argv for component in order if component in components for argv in commands.of(component)
    ]
    assert chosen == [argv for index, argv in enumerate(walk) if argv not in walk[:index]]
    assert len({tuple(argv) for argv in chosen}) == len(chosen)


@settings(max_examples=100, deadline=None)
@given(st.lists(argvs, max_size=4), selections)
def test_a_list_runs_whole_for_every_restore(
    commands: list[list[str]], components: set[restore.Component]
) -> None:
    """The list form keeps its meaning: every command, in order, whatever is restored."""
    assert restore.service_commands(commands, components, "stop") == commands


def parse(text: str) -> Policy:
    return config.parse(textwrap.dedent(text), "policy.yaml", {})


def test_both_forms_load_and_the_mapping_fills_missing_components_with_nothing() -> None:
    """restore.stop takes a list or a mapping; the mapping's absent keys are no commands."""
    listed = parse(f"sources: {{dirs: [/srv/data]}}\nrestore: {{stop: [{APP_STOP}]}}\n")
    mapped = parse(
        f"""\
        sources: {{dirs: [/srv/data]}}
        restore:
          stop:
            sqlite: [{APP_STOP}]
            redis: [{REDIS_STOP}]
        """
    )

    assert listed.restore.stop == [APP_STOP]
    assert mapped.restore.stop == ComponentCommands(sqlite=[APP_STOP], redis=[REDIS_STOP])
    assert mapped.restore.start == []


def test_an_unknown_component_key_is_named_with_its_line() -> None:
    """A typo in a component's name is one error with its dotted key and line, exit 78."""
    with pytest.raises(ConfigError) as caught:
        parse(
            f"""\
            sources: {{dirs: [/srv/data]}}
            restore:
              stop:
                redis: [{REDIS_STOP}]
                sqlit: [{APP_STOP}]
              start: {{dtaa: []}}
            """
        )

    assert caught.value.problems == (
        "policy.yaml:5: restore.stop.sqlit: unknown key",
        "policy.yaml:6: restore.start.dtaa: unknown key",
    )
