"""Just enough AppArmor to check exec rules (issue #18 item 3).

This kernel has no AppArmor, so the tests cannot watch a profile deny
anything. Instead they read a distribution's installed profile and decide,
the way AppArmor does, what happens when the confined program executes a
path: the rules' globs (``*``, ``**``, ``?``, ``{a,b}``, ``[...]``,
``@{VAR}``), ``deny`` rules first, exact rules before globs, and the exec
modes (``ix`` stays in the profile; ``Px``/``Ux``/``PUx``/``pix``... leave it).

Not modelled: abstractions and ``include``s (their rules are not counted, so
the check is stricter than AppArmor, never looser), owner/audit qualifiers'
meaning (rules are taken at face value), network/capability/file rules other
than exec, and profile attachment beyond a top-level profile's path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_EXEC_MODE = re.compile(r"[pPcCuU]?[uUi]?x")
_VARIABLE = re.compile(r"^\s*@\{(\w+)\}\s*\+?=\s*(.+?)\s*$")
_RULE = re.compile(
    r"^\s*(?:(audit)\s+)?(?:(deny)\s+)?(?:owner\s+)?"  # qualifiers
    r"(/\S*|@\{\w+\}\S*)\s+(\S+?)(?:\s*->\s*\S+)?\s*,\s*$"  # path, modes, -> target
)
_PROFILE = re.compile(r"^\s*(?:profile\s+(\S+)\s+)?(/\S*)?\s*(?:flags=\([^)]*\)\s*)?\{\s*$")


def glob_regex(glob: str) -> str:
    """An AppArmor path glob as a Python regex (anchored by the caller)."""
    out = []
    i = 0
    depth = 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "{":
            depth += 1
            out.append("(?:")
        elif c == "}" and depth:
            depth -= 1
            out.append(")")
        elif c == "," and depth:
            out.append("|")
        elif c == "[":
            end = glob.index("]", i + 1)
            body = glob[i + 1 : end]
            if body.startswith("^"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
            continue
        elif c == "\\" and i + 1 < len(glob):
            out.append(re.escape(glob[i + 1]))
            i += 2
            continue
        else:
            out.append(re.escape(c))
        i += 1
    if depth:
        raise ValueError(f"unbalanced braces in {glob!r}")
    return "".join(out)


def glob_match(glob: str, path: str) -> bool:
    return re.fullmatch(glob_regex(glob), path) is not None


def _expand(text: str, variables: dict[str, list[str]]) -> str:
    """@{VAR} → {value1,value2} (an alternation, as AppArmor reads it)."""

    def one(match: re.Match) -> str:
        values = variables.get(match.group(1))
        if values is None:
            raise ValueError(f"undefined variable @{{{match.group(1)}}}")
        values = [_expand(v, variables) for v in values]
        return values[0] if len(values) == 1 else "{" + ",".join(values) + "}"

    return re.sub(r"@\{(\w+)\}", one, text)


@dataclass(frozen=True)
class ExecRule:
    glob: str
    mode: str  # e.g. "ix", "PUx", "pix"; "" for a deny rule
    deny: bool = False

    @property
    def exact(self) -> bool:
        return not re.search(r"[*?{\[]", self.glob)


@dataclass
class Profile:
    name: str
    attach: str | None
    rules: list[ExecRule]

    def exec_rule(self, path: str) -> ExecRule | None:
        """The rule deciding an exec of ``path``: a deny, else an exact path, else a glob."""
        matching = [r for r in self.rules if glob_match(r.glob, path)]
        for rule in matching:
            if rule.deny:
                return rule
        exact = [r for r in matching if r.exact]
        return (exact or matching or [None])[0]


def parse(text: str, tunables: dict[str, list[str]] | None = None) -> list[Profile]:
    """The top-level profiles of a profile file with their exec rules
    (child profiles' rules are not their parent's)."""
    variables = dict(tunables or {})
    profiles: list[Profile] = []
    depth = 0
    current: Profile | None = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip() if not raw.lstrip().startswith("#include") else ""
        if not line.strip():
            continue
        var = _VARIABLE.match(line)
        if var and depth == 0:
            variables[var.group(1)] = [v.strip("\"'") for v in var.group(2).split()]
            continue
        head = _PROFILE.match(line)
        if head:
            depth += 1
            if depth == 1:
                current = Profile(head.group(1) or head.group(2), head.group(2), [])
                profiles.append(current)
            continue
        if line.strip() == "}":
            depth -= 1
            continue
        if depth != 1 or current is None:
            continue
        rule = _RULE.match(line)
        if not rule:
            continue
        _, deny, glob, mode = rule.groups()
        if deny:
            if "x" in mode:
                current.rules.append(ExecRule(_expand(glob, variables), "", deny=True))
            continue
        exec_mode = _EXEC_MODE.search(mode)
        if exec_mode:
            current.rules.append(ExecRule(_expand(glob, variables), exec_mode.group(0)))
    return profiles


TUNABLES = {"PROC": ["/proc/"], "HOME": ["/home/*/", "/root/"], "sys": ["/sys/"]}


def load(path: Path | str) -> list[Profile]:
    return parse(Path(path).read_text(), TUNABLES)


@dataclass(frozen=True)
class Outcome:
    allowed: bool
    confined: bool  # still inside the profile after the exec
    why: str


def exec_outcome(profile: Profile, path: str, others: list[Profile] = ()) -> Outcome:
    """What AppArmor does when ``profile`` executes ``path`` (resolved, no symlinks)."""
    rule = profile.exec_rule(path)
    if rule is None:
        return Outcome(False, True, f"no exec rule of profile {profile.name} matches {path}")
    if rule.deny:
        return Outcome(False, True, f"{path} denied by 'deny {rule.glob}' in {profile.name}")
    mode = rule.mode[:-1]  # without the x
    where = f"{path}: {rule.mode} ({rule.glob})"
    if mode[:1] in ("p", "P", "c", "C"):
        if mode[0] in "cC":
            return Outcome(True, True, f"{where}, a child profile of {profile.name}")
        attached = next((p for p in others if p.attach and glob_match(p.attach, path)), None)
        if attached is not None:
            return Outcome(True, True, f"{where}, profile {attached.name}")
        mode = mode[1:]  # the fallback when no profile attaches
    if mode in ("i",):
        return Outcome(True, True, f"{where}, stays in {profile.name}")
    if mode in ("u", "U"):
        return Outcome(True, False, f"{where}, unconfined")
    return Outcome(False, True, f"{where}: no profile attaches to it and no fallback")


# ---- the execs a program chain makes, from strace -f ---------------------------

_LINE = re.compile(r"^(\d+)\s+(.*)$")
_EXECVE = re.compile(r'^execve\("((?:[^"\\]|\\.)*)"')
_FORK = re.compile(r"^(?:clone3?|fork|vfork)\(")
_RESULT = re.compile(r"=\s+(-?\d+)(?:\s.*)?$")


def strace_events(text: str) -> tuple[int | None, dict[int, list[tuple[str, object]]]]:
    """(first pid, pid -> its events in order): ("exec", path) for a successful
    execve, ("fork", child pid) for a fork/clone. Handles strace's
    ``<unfinished ...>`` / ``<... resumed>`` split lines."""
    events: dict[int, list[tuple[str, object]]] = {}
    pending: dict[int, str] = {}
    first = None
    for raw in text.splitlines():
        match = _LINE.match(raw)
        if not match:
            continue
        pid, rest = int(match.group(1)), match.group(2)
        first = pid if first is None else first
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[: -len("<unfinished ...>")]
            continue
        if rest.startswith("<... "):
            rest = pending.pop(pid, "") + rest.split("resumed>", 1)[-1]
        result = _RESULT.search(rest)
        if result is None:
            continue
        value = int(result.group(1))
        execve = _EXECVE.match(rest)
        if execve and value == 0:
            events.setdefault(pid, []).append(("exec", execve.group(1)))
        elif _FORK.match(rest) and value > 0:
            events.setdefault(pid, []).append(("fork", value))
    return first, events


@dataclass(frozen=True)
class Step:
    path: str  # as AppArmor sees it (resolved, mapped onto the installed layout)
    outcome: Outcome


def confined_execs(
    text: str, profile: Profile, others: list[Profile], where: callable = lambda p: p
) -> list[Step]:
    """Every exec made while still confined by ``profile``, starting with the
    first process's first exec (the program the confined daemon runs) and
    following forks; ``where`` maps a traced path to the installed one."""
    first, events = strace_events(text)
    steps: list[Step] = []

    def walk(pid: int, confined: bool) -> None:
        for kind, value in events.get(pid, []):
            if kind == "fork":
                walk(value, confined)
            elif confined:
                path = where(value)
                outcome = exec_outcome(profile, path, others)
                steps.append(Step(path, outcome))
                confined = outcome.confined

    if first is not None:
        walk(first, True)
    return steps
