"""Code-execution sandbox for the tool-integrated math agent.

Model-written Python runs only here, never in the host process. A `Sandbox` owns a pool of worker
processes; each worker holds the live interpreter state of one trajectory, so turn k of a trajectory
runs only cell k (no O(turns^2) replay of earlier cells). When a worker dies (timeout kill, crash,
`os._exit`, ...) or is taken over by another trajectory, the trajectory's state is rebuilt on its next
call by replaying, in a fresh worker, the earlier cells that succeeded.

    with Sandbox(SandboxConfig(wall_time_s=5)) as sandbox:
        sandbox.run("traj-0", "import sympy as sp\\nx = sp.symbols('x')")
        result = sandbox.run("traj-0", "sp.solve(x**2 - 4, x)")
        result.output      # '[-2, 2]\\n'  (stdout + stderr, then the repr of a last expression)
        results = sandbox.run_batch([("traj-0", "x"), ("traj-1", "1/0")])
        sandbox.close("traj-0")

What a cell sees (notebook semantics): stdout and stderr interleaved as printed, then the repr of the
last statement if it is an expression that is not None (a trailing `;` suppresses it, as in Jupyter).
Errors come back as a shortened traceback: frames of the sandbox internals are dropped, library paths
are made relative, and long output is cut in the middle of the printed text so the traceback's last
line always survives.

Limits of one call (see `SandboxConfig`):
  * wall time: an in-process timer interrupts the cell (state kept, like a notebook interrupt); if the
    cell does not stop within `kill_grace_s`, the host SIGKILLs the worker's process group.
  * CPU time: an in-process CPU timer (ITIMER_PROF), backed by RLIMIT_CPU set from the host (prlimit).
  * memory: RLIMIT_AS on the whole worker process; allocations beyond it raise MemoryError.
  * output: `max_output_chars` characters returned; printing more costs nothing (it is dropped).
  * files: RLIMIT_FSIZE per file; writes only inside the trajectory's private folder (its cwd, HOME
    and TMPDIR), which is deleted by `close`.
  * processes, network, signals: refused by an audit hook (`sys.addaudithook`): subprocess, os.system,
    os.fork/exec/spawn/posix_spawn, multiprocessing, sockets and network clients, signals to other
    processes, changing resource limits, ctypes lookups of libc functions that do those things, and
    reads of other processes' /proc entries, the host's home folder and other trajectories' folders.
    RLIMIT_NPROC also applies where it binds (not for root). When the host may create a network
    namespace (root on Linux) each worker also runs in an empty one, so even code that slips past
    the hook has no network.
  * environment: workers start from a scrubbed environment (no host variables, so no API keys).

Trust model: this protects the host from accidents of model-written code (loops, memory bombs, forks,
stray writes, crashes, huge prints), and every such case is tested. The in-process audit hook is
not a security boundary against adversarial code (ctypes can reach anything in the process); the
OS-level parts (separate process group, rlimits, empty network namespace, scrubbed environment,
host-side kill) still hold. Run untrusted third-party code inside a container or VM.

Replay re-runs code: cells that draw random numbers or read the clock get new values (workers use
PYTHONHASHSEED=0, so set and dict orders do repeat), and files already written stay in the folder.
A cell that failed is never replayed, so its partial effects are gone after a rebuild.

Linux only (/proc, prlimit, waitid). The worker side of this file runs as a script
(`python -s -B sandbox.py ...`), so a worker never imports the lmforge package (or torch); it
pre-imports `SandboxConfig.preload_modules` instead, and `gc.freeze()`s them.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import linecache
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

__all__ = ["ExecResult", "Sandbox", "SandboxConfig", "SandboxError"]

ERROR_KINDS = ("exception", "syntax", "timeout", "memory", "crash", "refused")

_THIS_FILE = os.path.abspath(__file__)
_MIB = 1 << 20
_MAX_MESSAGE_BYTES = 64 * _MIB  # a reply larger than this is a protocol error, never trusted
_HEADER_BYTES = 4


class SandboxError(RuntimeError):
    """The sandbox itself failed (a worker could not start); never raised for model code."""


class SandboxRefused(PermissionError):
    """Raised inside the worker when the audit hook refuses an operation."""


# Shown as plain "SandboxRefused: ..." in tracebacks, not "__main__.SandboxRefused".
SandboxRefused.__module__ = "builtins"


@dataclass
class SandboxConfig:
    """Limits and pool settings of a `Sandbox`.

    Each worker process holds the live state of one trajectory; with more open trajectories than
    `num_workers`, the least recently used idle trajectory is evicted and replays its successful
    cells when it runs again, so set `num_workers` to at least the number of trajectories in flight.
    `max_parallel` bounds how many cells execute at once (default: the CPU count), which keeps wall
    time limits meaningful when many trajectories share few cores.
    """

    wall_time_s: float = 10.0
    cpu_time_s: float = 10.0
    memory_bytes: int = 2 << 30  # RLIMIT_AS of the whole worker (interpreter + preloads ~0.1-0.2 GiB)
    max_output_chars: int = 4000
    max_file_bytes: int = 64 * _MIB  # RLIMIT_FSIZE: largest file a cell may write
    max_open_files: int = 256  # RLIMIT_NOFILE
    max_processes: int = 16  # RLIMIT_NPROC head-room above the user's current count (not for root)
    num_workers: int = 16
    max_parallel: int | None = None  # None: min(num_workers, os.cpu_count())
    kill_grace_s: float = 1.0  # after the wall limit, how long the in-process interrupt may take
    startup_timeout_s: float = 60.0
    preload_modules: tuple[str, ...] = (
        "math", "cmath", "fractions", "decimal", "itertools", "functools", "collections",
        "statistics", "random", "re", "numpy", "sympy",
    )
    isolate_network: bool = True  # empty network namespace per worker where the OS allows it
    reuse_workers: bool = True  # a closed trajectory's worker serves the next one (fresh namespace)
    max_cells_per_worker: int = 1000  # a worker is replaced after this many cells (between trajectories)
    base_dir: str | None = None  # where the private folders live; None: the system temp folder
    python: str | None = None  # interpreter of the workers; None: sys.executable
    secret_paths: tuple[str, ...] | None = None  # unreadable; None: the host's $HOME, /root, /etc/shadow

    def __post_init__(self) -> None:
        for name in ("wall_time_s", "cpu_time_s", "kill_grace_s", "startup_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"SandboxConfig.{name} must be a number, got {type(value).__name__}")
            if not value > 0 or math.isinf(value):
                raise ValueError(f"SandboxConfig.{name} must be a positive finite number, got {value!r}")
        ints = {"memory_bytes": 64 * _MIB, "max_output_chars": 200, "max_file_bytes": 4096,
                "max_open_files": 32, "max_processes": 0, "num_workers": 1, "max_cells_per_worker": 1}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"SandboxConfig.{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"SandboxConfig.{name} must be >= {low}, got {value}")
        if self.max_parallel is not None:
            if isinstance(self.max_parallel, bool) or not isinstance(self.max_parallel, int):
                raise TypeError(f"SandboxConfig.max_parallel must be an int or None, got {type(self.max_parallel).__name__}")
            if not 1 <= self.max_parallel <= self.num_workers:
                raise ValueError(
                    f"SandboxConfig.max_parallel must be in [1, num_workers={self.num_workers}], got {self.max_parallel}")
        if isinstance(self.preload_modules, str):
            raise TypeError("SandboxConfig.preload_modules must be a sequence of module names, not a str")
        self.preload_modules = tuple(self.preload_modules)
        if self.secret_paths is not None:
            if isinstance(self.secret_paths, str):
                raise TypeError("SandboxConfig.secret_paths must be a sequence of paths, not a str")
            self.secret_paths = tuple(self.secret_paths)
        if self.base_dir is not None and not os.path.isdir(self.base_dir):
            raise ValueError(f"SandboxConfig.base_dir must be an existing folder, got {self.base_dir!r}")
        if self.python is not None and not (os.path.isfile(self.python) and os.access(self.python, os.X_OK)):
            raise ValueError(f"SandboxConfig.python must be an executable Python interpreter, got {self.python!r}")

    @property
    def parallel(self) -> int:
        """How many cells may execute at the same time."""
        if self.max_parallel is not None:
            return self.max_parallel
        return max(1, min(self.num_workers, os.cpu_count() or 1))


@dataclass(frozen=True)
class ExecResult:
    """What one call produced.

    `output` is the text to show the model: printed output, the last expression's repr, and on
    failure a shortened traceback (or a crash/timeout message) whose last line is `error`.
    `error_kind` is None on success, else one of "exception", "syntax", "timeout", "memory",
    "crash", "refused". `elapsed_s` is host wall time for the call, including any state rebuild
    (`replayed_cells` earlier cells re-run first) and worker start-up.
    """

    trajectory_id: Hashable
    cell_index: int
    output: str
    ok: bool
    error_kind: str | None
    error: str | None
    elapsed_s: float
    truncated: bool = False
    replayed_cells: int = 0


# ================================================================================================
# Shared by host and worker: shaping the text the model sees.
# ================================================================================================

def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line
    return ""


def _compose_output(printed: str, printed_total: int, error_text: str, max_chars: int) -> tuple[str, bool]:
    """Join printed text and an error text into at most `max_chars` characters.

    `printed_total` is how many characters were printed in all (more than `len(printed)` when the
    worker already dropped some). When cutting, the printed text keeps its head, the error text keeps
    its tail (at most half the budget) and the error's last line is always kept whole if it fits.
    """
    printed_total = max(printed_total, len(printed))
    if printed_total == len(printed) and len(printed) + len(error_text) <= max_chars:
        return printed + error_text, False
    error_kept = error_text
    if len(error_kept) > max_chars // 2:
        last = _last_line(error_text)[: max_chars // 2 - 8]
        lines = error_text.rstrip("\n").splitlines()[:-1]
        kept: list[str] = []
        room = max_chars // 2 - len(last) - 8
        for line in reversed(lines):
            if len(line) + 1 > room:
                break
            kept.append(line)
            room -= len(line) + 1
        error_kept = "...\n" + "".join(line + "\n" for line in reversed(kept)) + last + "\n"
    dropped_error = len(error_text) - len(error_kept)
    marker_template = "\n... [{} characters of output cut] ...\n"
    marker = marker_template.format(printed_total + dropped_error)
    head_room = max(0, max_chars - len(error_kept) - len(marker))
    head = printed[:head_room]
    marker = marker_template.format(printed_total - len(head) + max(0, dropped_error))
    text = head + marker + error_kept
    return text[: max_chars] if len(text) > max_chars else text, True


def _clean_text(text: str) -> str:
    """Make text safe for JSON and tokenizers: lone surrogates become '?'."""
    return text.encode("utf-8", "replace").decode("utf-8")


# ================================================================================================
# Worker side: runs in the child process (`python -s -B sandbox.py REQ_FD RESP_FD SETTINGS_JSON`).
# ================================================================================================

class _CellTimeout(BaseException):
    """Raised in the cell by the timer signals. A BaseException, so `except Exception` in model code
    does not swallow it; code that swallows it anyway is killed by the host after `kill_grace_s`."""


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PROCESS_EVENTS = {
    "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "os.startfile",
    "subprocess.Popen", "pty.spawn",
}
_NETWORK_EVENTS = {
    "urllib.Request", "http.client.connect", "ftplib.connect", "smtplib.connect", "imaplib.open",
    "nntplib.connect", "poplib.connect", "telnetlib.Telnet.open", "webbrowser.open",
}
_SINGLE_PATH_WRITE_EVENTS = {
    "os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.lchown", "os.utime", "os.truncate",
    "os.mkfifo", "os.mknod", "os.setxattr", "os.removexattr", "os.chflags", "os.lchflags",
    "shutil.rmtree", "shutil.chown", "tempfile.mkstemp", "tempfile.mkdtemp", "shutil.make_archive",
}
_TWO_PATH_WRITE_EVENTS = {"os.rename", "os.link", "shutil.move"}  # both ends must be inside
_COPY_EVENTS = {"shutil.copyfile", "shutil.copytree", "shutil.copymode", "shutil.copystat"}
# libc functions a ctypes user could call to do what the hook refuses at the Python level.
_DENIED_C_FUNCTIONS = frozenset("""
    fork vfork clone clone3 __clone system popen execv execve execvp execvpe execl execlp execle fexecve
    posix_spawn posix_spawnp kill killpg tgkill tkill sigqueue pidfd_send_signal ptrace syscall daemon
    socket socketpair connect bind listen accept accept4 sendto sendmsg getaddrinfo gethostbyname
    setrlimit setrlimit64 prlimit prlimit64 unshare setns setsid setpgid chroot mount umount umount2
    open open64 openat openat64 creat creat64 fopen fopen64 freopen freopen64 rename renameat renameat2
    unlink unlinkat mkdir mkdirat rmdir symlink symlinkat link linkat truncate truncate64 chmod chown
    lchown remove
""".split())


class _WorkerState:
    """Everything the worker keeps across requests (one instance, module global in the worker)."""

    def __init__(self, settings: dict):
        self.settings = settings
        self.folder: str | None = None  # the current trajectory's private folder (realpath)
        self.namespace: dict = {}
        self.root = os.path.realpath(settings["root"])  # parent of all trajectories' folders
        self.secret_paths = [os.path.realpath(p) for p in settings["secret_paths"]]
        self.read_roots: list[str] = []  # always readable even if under a secret path (the venv)
        self.cell_files: list[str] = []
        self.capture_inode = os.fstat(1).st_ino
        self.capture_spare_fd = os.dup(1)
        self.pid = os.getpid()
        self.reserve: bytearray | None = None  # freed on MemoryError so the reply can be built
        self.timers_armed = False
        self.saved: dict = {}


_W: _WorkerState | None = None


def _refuse(what: str, why: str) -> None:
    raise SandboxRefused(f"{what} is not allowed in this sandbox: {why}")


def _real(path) -> str:
    return os.path.realpath(os.fsdecode(os.fspath(path)))


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _check_write(path, what: str) -> None:
    if path is None or isinstance(path, int):
        return  # an already open file descriptor
    real = _real(path)
    if real == "/dev/null" or (_W.folder is not None and _is_under(real, _W.folder)):
        return
    _refuse(what, f"{os.fsdecode(os.fspath(path))!r} is outside the working folder; "
                  "write files under the current directory instead")


def _check_read(path, what: str) -> None:
    if path is None or isinstance(path, int):
        return
    real = _real(path)
    if real.startswith("/proc/"):
        part = real.split("/")[2]
        if part.isdigit() and int(part) != _W.pid:
            _refuse(what, f"{real!r} belongs to another process")
        return
    if _W.folder is not None and _is_under(real, _W.folder):
        return
    if any(_is_under(real, root) for root in _W.read_roots):
        return
    if _is_under(real, _W.root) or any(_is_under(real, secret) for secret in _W.secret_paths):
        _refuse(what, f"{os.fsdecode(os.fspath(path))!r} is private to the host")


def _audit_hook(event: str, args: tuple) -> None:
    # Called for every audit event in the worker, so the common case must return fast.
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return
        if (flags or 0) & _WRITE_FLAGS or (isinstance(mode, str) and any(c in mode for c in "wax+")):
            _check_write(path, "writing a file")
        else:
            _check_read(path, "reading a file")
    elif event in _PROCESS_EVENTS:
        _refuse(event, "it runs Python only, without shells, subprocesses or forks")
    elif event.startswith("socket.") and event != "socket.gethostname":
        _refuse(event, "there is no network access")
    elif event in _NETWORK_EVENTS:
        _refuse(event, "there is no network access")
    elif event in _SINGLE_PATH_WRITE_EVENTS:
        _check_write(args[0] if args else None, event)
    elif event in _TWO_PATH_WRITE_EVENTS:
        _check_write(args[0], event)
        _check_write(args[1], event)
    elif event in _COPY_EVENTS:
        _check_read(args[0], event)
        _check_write(args[1], event)
    elif event == "os.symlink":
        _check_write(args[1], event)
    elif event == "shutil.unpack_archive":
        _check_write(args[1] if len(args) > 1 else None, event)
    elif event in ("os.listdir", "os.scandir"):
        _check_read(args[0] if args else None, event)
    elif event == "os.chdir":
        target = args[0]
        if isinstance(target, int) or _W.folder is None or not _is_under(_real(target), _W.folder):
            _refuse("os.chdir", "the current directory must stay inside the working folder")
    elif event in ("os.kill", "os.killpg"):
        if args[0] != _W.pid:
            _refuse(event, "sending signals to other processes is not allowed")
    elif event in ("resource.setrlimit", "resource.prlimit"):
        _refuse(event, "resource limits are fixed by the sandbox")
    elif event == "ctypes.dlsym":
        name = args[1] if len(args) > 1 else None
        if isinstance(name, str) and name in _DENIED_C_FUNCTIONS:
            _refuse(f"the C function {name!r} (via ctypes)", "it could bypass the sandbox's rules")
    elif event == "import":
        if args[0] == "_posixsubprocess":
            _refuse("importing _posixsubprocess", "it runs Python only, without subprocesses")


def _refused_fork_exec(*args, **kwargs):
    _refuse("starting a subprocess", "it runs Python only, without shells, subprocesses or forks")


class _CellOutput(io.TextIOBase):
    """sys.stdout/sys.stderr of a cell: writes straight to fd 1 (the capture file) so that Python
    and C-level output keep their order and survive a crash, and stops writing (but keeps
    counting) once `byte_budget` bytes are out, so a huge print costs no memory or disk."""

    def __init__(self, fd: int, byte_budget: int):
        super().__init__()
        self._fd = fd
        self.bytes_left = byte_budget
        self.chars = 0

    @property
    def encoding(self):  # noqa: D401 - file protocol
        return "utf-8"

    @property
    def errors(self):
        return "backslashreplace"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd

    def flush(self) -> None:
        return None

    def write(self, text) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if self.bytes_left > 0 and text:
            data = text[: self.bytes_left].encode("utf-8", "backslashreplace")[: self.bytes_left]
            _write_all(self._fd, data)
            self.bytes_left -= len(data)
        self.chars += len(text)
        return len(text)

    @property
    def buffer(self):
        return _ByteOutput(self)


class _ByteOutput(io.RawIOBase):
    """`sys.stdout.buffer` for code that writes bytes."""

    def __init__(self, text_output: _CellOutput):
        super().__init__()
        self._text = text_output

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self._text.write(data.decode("utf-8", "replace"))
        return len(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exact_blocking(fd: int, size: int) -> bytes | None:
    chunks, need = [], size
    while need:
        chunk = os.read(fd, need)
        if not chunk:
            return None
        chunks.append(chunk)
        need -= len(chunk)
    return b"".join(chunks)


def _send(fd: int, message: dict) -> None:
    data = json.dumps(message).encode("utf-8")
    _write_all(fd, len(data).to_bytes(_HEADER_BYTES, "big") + data)


def _receive_blocking(fd: int) -> dict | None:
    header = _read_exact_blocking(fd, _HEADER_BYTES)
    if header is None:
        return None
    body = _read_exact_blocking(fd, int.from_bytes(header, "big"))
    return None if body is None else json.loads(body)


def _cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _on_timer(signum, frame):
    if _W.timers_armed:  # a signal handled after the cell ended must not hit the worker's own code
        raise _CellTimeout("wall" if signum == signal.SIGALRM else "cpu")


def _arm_timers() -> None:
    settings = _W.settings
    _W.timers_armed = True
    signal.signal(signal.SIGALRM, _on_timer)
    signal.signal(signal.SIGPROF, _on_timer)
    # The short interval re-raises if model code swallows the first interrupt.
    signal.setitimer(signal.ITIMER_REAL, settings["wall_time_s"], 0.25)
    signal.setitimer(signal.ITIMER_PROF, settings["cpu_time_s"], 0.25)


def _disarm_timers() -> None:
    _W.timers_armed = False
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.setitimer(signal.ITIMER_PROF, 0)


def _shorten_path(filename: str) -> str:
    if filename.startswith("<"):
        return filename
    if _W.folder is not None and filename.startswith(_W.folder + "/"):
        return filename[len(_W.folder) + 1:]
    for prefix in _W.settings["path_prefixes"]:
        if filename.startswith(prefix):
            return filename[len(prefix):].lstrip("/")
    return filename


def _clean_traceback(te: traceback.TracebackException, seen: set) -> None:
    """Drop the sandbox's own frames and make library paths relative, through the whole chain."""
    if id(te) in seen:
        return
    seen.add(id(te))
    frames = []
    for frame in te.stack:
        if frame.filename == _THIS_FILE:
            continue
        frame.line  # load the source line before renaming the file it comes from
        frame.filename = _shorten_path(frame.filename)
        frames.append(frame)
    te.stack = traceback.StackSummary.from_list(frames)
    for linked in (te.__cause__, te.__context__):
        if linked is not None:
            _clean_traceback(linked, seen)


def _format_exception(exc: BaseException, final_line: str | None = None) -> str:
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__, compact=True)
    _clean_traceback(te, set())
    if final_line is None:
        return "".join(te.format())
    stack = "".join(te.stack.format())
    head = "Traceback (most recent call last):\n" + stack if stack else ""
    return head + final_line + "\n"


def _chain_has(exc: BaseException | None, kind: type) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _compile_cell(code: str, filename: str):
    """Compile a cell into (statements, last_expression_or_None), notebook style."""
    tree = ast.parse(code, filename, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        node = tree.body[-1]
        lines = io.StringIO(code, newline=None).read().split("\n")  # the parser's notion of lines
        # end_col_offset counts UTF-8 bytes, not characters.
        line = lines[node.end_lineno - 1].encode("utf-8") if node.end_lineno <= len(lines) else b""
        rest = line[node.end_col_offset:].decode("utf-8", "ignore")
        if not rest.lstrip().startswith(";"):  # `expr;` suppresses the repr, as in Jupyter
            last = compile(ast.Expression(node.value), filename, "eval")
            tree.body.pop()
    return compile(tree, filename, "exec"), last


def _ensure_capture_fds() -> None:
    """Model code may close or replace fds 1/2; point them back at the capture file (through a
    spare descriptor kept from start-up: the audit hook would refuse opening it again)."""
    with contextlib.suppress(OSError):  # a closed fd 1/2 is repaired below like a replaced one
        if os.fstat(1).st_ino == _W.capture_inode and os.fstat(2).st_ino == _W.capture_inode:
            return
    os.dup2(_W.capture_spare_fd, 1)
    os.dup2(_W.capture_spare_fd, 2)


def _execute_cell(code: str, cell_index: int) -> dict:
    """Run one cell in the trajectory's namespace; return the reply for the host."""
    settings = _W.settings
    filename = f"<cell {cell_index}>"
    linecache.cache[filename] = (len(code), None, io.StringIO(code, newline=None).readlines(), filename)
    _W.cell_files.append(filename)
    _ensure_capture_fds()
    os.ftruncate(1, 0)
    out = _CellOutput(1, settings["capture_bytes"])
    sys.stdout = sys.stderr = out
    if _W.saved["stdin"].closed:  # exit() closes it
        _W.saved["stdin"] = open(os.devnull)  # noqa: SIM115 - lives as long as the worker
    sys.stdin = _W.saved["stdin"]
    kind = None
    error_text = ""
    try:
        try:
            statements, last_expression = _compile_cell(code, filename)
        except (SyntaxError, ValueError) as exc:  # ValueError: null bytes in the source
            kind = "syntax"
            error_text = "".join(traceback.format_exception_only(type(exc), exc))
        else:
            _arm_timers()
            try:
                exec(statements, _W.namespace)
                if last_expression is not None:
                    value = eval(last_expression, _W.namespace)
                    if value is not None:
                        out.write(repr(value) + "\n")
            finally:
                _disarm_timers()
    except _CellTimeout as exc:
        _disarm_timers()
        kind = "timeout"
        if exc.args and exc.args[0] == "cpu":
            limit = f"CPU-time limit of {settings['cpu_time_s']:g} s"
        else:
            limit = f"wall-time limit of {settings['wall_time_s']:g} s"
        error_text = _format_exception(exc, f"TimeoutError: the cell was stopped after exceeding the {limit}")
    except BaseException as exc:  # noqa: BLE001 - everything model code raises is reported, never fatal
        _disarm_timers()
        if isinstance(exc, MemoryError):
            _W.reserve = None  # room to format the traceback
            kind = "memory"
        elif _chain_has(exc, SandboxRefused):
            kind = "refused"
        else:
            kind = "exception"
        error_text = _format_exception(exc)
        if kind == "memory" and _last_line(error_text).strip() == "MemoryError":
            error_text = error_text.rstrip("\n") + (
                f": out of memory (the sandbox allows {settings['memory_bytes'] // _MIB} MiB)\n")
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    for stream in (sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()  # model code may have printed through these buffered streams
    _ensure_capture_fds()
    captured = os.pread(1, settings["capture_bytes"], 0)
    file_bytes = os.fstat(1).st_size
    os.ftruncate(1, 0)
    printed = captured.decode("utf-8", "replace")
    extra_c_level = max(0, file_bytes - (settings["capture_bytes"] - out.bytes_left))
    text, truncated = _compose_output(printed, out.chars + extra_c_level, error_text, settings["max_output_chars"])
    if _W.reserve is None:
        with contextlib.suppress(MemoryError):  # re-armed on a later call once memory is back
            _W.reserve = bytearray(4 * _MIB)
    return {
        "ok": kind is None, "kind": kind, "output": _clean_text(text),
        "error": _clean_text(_last_line(error_text)) if kind else None,
        "truncated": truncated,
    }


def _reset_namespace(folder: str | None) -> bool:
    """Fresh `__main__` namespace (and folder) for a new trajectory; return False when the process
    carries state a fresh namespace cannot undo (threads still running), so the host replaces it."""
    import builtins
    import gc
    import types

    saved = _W.saved
    _W.namespace.clear()
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    _W.namespace = module.__dict__
    for filename in _W.cell_files:
        linecache.cache.pop(filename, None)
    _W.cell_files = []
    builtins.__dict__.clear()
    builtins.__dict__.update(saved["builtins"])
    sys.setrecursionlimit(saved["recursion_limit"])
    sys.settrace(None)
    sys.setprofile(None)
    gc.enable()
    os.umask(saved["umask"])
    sys.displayhook, sys.excepthook = sys.__displayhook__, sys.__excepthook__
    sys.stdin = saved["stdin"]
    sys.path[:] = saved["sys_path"]
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    import warnings

    warnings.filters[:] = saved["warning_filters"]
    numpy = sys.modules.get("numpy")
    if numpy is not None and "numpy_print" in saved:
        with contextlib.suppress(Exception):  # cosmetic state only
            numpy.set_printoptions(**saved["numpy_print"])
            numpy.seterr(**saved["numpy_err"])
    os.environ.clear()
    os.environ.update(saved["environ"])
    if folder is not None:
        _W.folder = os.path.realpath(folder)
        os.environ.update(HOME=_W.folder, TMPDIR=_W.folder)
        tempfile = sys.modules.get("tempfile")
        if tempfile is not None:
            tempfile.tempdir = None  # re-read TMPDIR
        os.chdir(_W.folder)
        sys.path.insert(0, _W.folder)
    else:
        _W.folder = None
    gc.collect()
    return threading.active_count() == 1


def _apply_limits(settings: dict) -> None:
    import resource

    def limit(which, value):
        try:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass  # not supported here; the host-side limits still apply

    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_FSIZE, settings["max_file_bytes"])
    limit(resource.RLIMIT_NOFILE, settings["max_open_files"])
    if os.geteuid() != 0:  # RLIMIT_NPROC does not bind for root; counts every task of the user
        limit(resource.RLIMIT_NPROC, _user_task_count() + settings["max_processes"])
    limit(resource.RLIMIT_AS, settings["memory_bytes"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over-size writes raise OSError instead of killing


def _user_task_count() -> int:
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return count


def _isolate_network() -> bool:
    """Enter an empty network namespace (only loopback, down) when the OS allows it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        clone_newnet = 0x40000000
        return libc.unshare(clone_newnet) == 0
    except Exception:  # noqa: BLE001 - not Linux, no permission: the audit hook still refuses sockets
        return False


def _worker_main(argv: Sequence[str]) -> None:
    global _W
    request_fd, reply_fd = int(argv[0]), int(argv[1])
    settings = json.loads(argv[2])
    script_dir = os.path.dirname(_THIS_FILE)
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != script_dir]
    _W = _WorkerState(settings)
    _apply_limits(settings)
    network_isolated = settings["isolate_network"] and _isolate_network()
    preloaded = []
    for name in settings["preload"]:
        with contextlib.suppress(Exception):  # optional modules (sympy) may be missing
            __import__(name)
            preloaded.append(name)
    import builtins
    import faulthandler
    import subprocess  # noqa: F401 - imported before the hook so that its import stays cheap
    import warnings

    with contextlib.suppress(ImportError):  # not every platform has it
        import _posixsubprocess

        _posixsubprocess.fork_exec = _refused_fork_exec  # the one spawn path without an audit event
    faulthandler.enable(file=sys.__stderr__, all_threads=True)
    _W.read_roots = sorted({os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path]
                            if p and os.path.isdir(p)})
    settings["path_prefixes"] = sorted({p + "/" for p in _W.read_roots}, key=len, reverse=True)
    _W.saved = {
        "worker_module": sys.modules["__main__"],  # the worker's own globals, once __main__ is the user's
        "builtins": dict(builtins.__dict__),
        "recursion_limit": sys.getrecursionlimit(),
        "umask": 0o077,  # files in the private folder are private
        "stdin": open(os.devnull),  # noqa: SIM115 - lives as long as the worker
        "sys_path": list(sys.path),
        "warning_filters": list(warnings.filters),
        "environ": dict(os.environ),
    }
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        _W.saved["numpy_print"] = numpy.get_printoptions()
        _W.saved["numpy_err"] = numpy.geterr()
    os.umask(0o077)
    _W.reserve = bytearray(4 * _MIB)
    import gc

    gc.collect()
    gc.freeze()  # preloaded modules never become garbage: keep them out of every later collection
    sys.addaudithook(_audit_hook)
    # Spare copies of the protocol pipes, so a cell that closes or replaces them (they are plain
    # fds) does not cut the worker off; sys.argv no longer names them.
    pipes = {fd: (os.dup(fd), os.fstat(fd).st_ino) for fd in (request_fd, reply_fd)}
    sys.argv = [""]
    _send(reply_fd, {"op": "ready", "pid": os.getpid(), "preloaded": preloaded,
                     "network_isolated": bool(network_isolated), "cpu_s": _cpu_seconds()})
    while True:
        _repair_fds(pipes)
        request = _receive_blocking(request_fd)
        if request is None:  # the host closed the pipe or exited
            os._exit(0)
        try:
            reply = _serve(request)
        except _CellTimeout:  # the limit hit in the instant between the cell's end and disarming
            reply = {"ok": False, "kind": "timeout", "output": "TimeoutError: the cell reached its time limit\n",
                     "error": "TimeoutError: the cell reached its time limit", "truncated": False, "failed": []}
        except BaseException as exc:  # noqa: BLE001 - report instead of dying; the host decides
            _W.reserve = None
            reply = {"error": f"internal: {type(exc).__name__}: {exc}"}
        reply["cpu_s"] = _cpu_seconds()
        reply["id"] = request.get("id")  # the host drops the worker on a mismatch (injected replies)
        _repair_fds(pipes)
        _send(reply_fd, reply)


def _repair_fds(pipes: dict) -> None:
    for fd, (spare, inode) in pipes.items():
        with contextlib.suppress(OSError):  # a closed fd is restored below
            if os.fstat(fd).st_ino == inode:
                continue
        os.dup2(spare, fd)


def _serve(request: dict) -> dict:
    op = request["op"]
    if op == "run":
        return _execute_cell(request["code"], request["cell"])
    if op == "replay":
        failed = []
        for cell_index, code in request["cells"]:
            if not _execute_cell(code, cell_index)["ok"]:
                failed.append(cell_index)
        return {"failed": failed}
    if op == "reset":
        return {"clean": _reset_namespace(request["folder"])}
    if op == "ping":
        return {}
    raise ValueError(f"unknown op {op!r}")


# ================================================================================================
# Host side.
# ================================================================================================

class _WorkerGone(Exception):
    """The worker died or broke the protocol during a request. `closed`: its pipe closed, so it
    is exiting by itself and its exit status is worth waiting for."""

    def __init__(self, message: str = "", closed: bool = False):
        super().__init__(message)
        self.closed = closed


class _WorkerDiedIdle(_WorkerGone):
    """The worker was dead before it received the request (so the request did not run)."""


class _WorkerTimedOut(Exception):
    """The worker did not answer before the host's deadline (it has been killed)."""


class _Worker:
    """Host-side handle of one worker process."""

    def __init__(self, process, request_fd: int, reply_fd: int, capture_path: str):
        self.process = process
        self.pid = process.pid
        self.request_fd = request_fd
        self.reply_fd = reply_fd
        self.capture_path = capture_path
        self.ready = False
        self.network_isolated = False
        self.preloaded: list[str] = []
        self.owner: _Trajectory | None = None
        self.busy = False
        self.dead = False
        self.killed_by_host = False
        self.cells_run = 0
        self.trajectories_served = 0
        self.cpu_s = 0.0


class _Trajectory:
    def __init__(self, trajectory_id: Hashable, folder: str):
        self.id = trajectory_id
        self.folder = folder
        self.history: list[tuple[int, str]] = []  # (cell index, code) of cells that succeeded
        self.next_cell = 1
        self.worker: _Worker | None = None
        self.lock = threading.Lock()
        self.last_used = 0.0
        self.state_lost = False  # a replay failed: tell the model once


def _read_exact(fd: int, size: int, deadline: float) -> bytes:
    import select

    chunks, need = [], size
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while need:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise TimeoutError
        chunk = os.read(fd, min(need, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        need -= len(chunk)
    return b"".join(chunks)


def _has_exited(pid: int) -> bool:
    """Whether a child has exited, without reaping it (a zombie keeps its pid and group id ours)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


_SIGNAL_MEANING = {
    "SIGSEGV": "segmentation fault", "SIGBUS": "bus error", "SIGABRT": "aborted", "SIGFPE": "arithmetic fault",
    "SIGILL": "illegal instruction", "SIGKILL": "killed", "SIGXCPU": "CPU-time limit exceeded",
    "SIGXFSZ": "file-size limit exceeded", "SIGTERM": "terminated",
}


def _host_path_prefixes() -> list[str]:
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path) if p}
    return sorted((root + "/" for root in roots if root != "/"), key=len, reverse=True)


def _clean_crash_log(text: str) -> str:
    """Keep what the model printed and faulthandler's stack, minus the sandbox's own lines and
    with library paths made relative (the worker uses the host's interpreter and paths)."""
    prefixes = _host_path_prefixes()
    kept = []
    skipping_source = False
    for line in text.splitlines(True):
        if skipping_source and line.startswith("    "):
            continue  # source and caret lines under a dropped sandbox frame
        skipping_source = False
        if _THIS_FILE in line:
            skipping_source = True
            continue
        if line.startswith("Extension modules:"):
            continue
        if line.startswith("Current thread 0x") or line.startswith("Thread 0x"):
            line = "Stack (most recent call first):\n"
        if line.startswith('  File "/'):
            for prefix in prefixes:
                if line.startswith('  File "' + prefix):
                    line = '  File "' + line[len('  File "' + prefix):]
                    break
        kept.append(line)
    return "".join(kept)


class Sandbox:
    """A pool of sandboxed Python workers; see the module docstring.

    Thread-safe: `run` may be called from several threads; calls for one trajectory run in order.
    Use as a context manager, or call `shutdown()`; workers are also killed when the object is
    garbage-collected or the interpreter exits.
    """

    def __init__(self, config: SandboxConfig | None = None):
        import tempfile
        import weakref

        if config is None:
            config = SandboxConfig()
        if not isinstance(config, SandboxConfig):
            raise TypeError(f"config must be a SandboxConfig, got {type(config).__name__}")
        self.config = config
        self._python = config.python or sys.executable
        self._root = os.path.realpath(tempfile.mkdtemp(prefix="lmforge-sandbox-", dir=config.base_dir))
        secret_paths = config.secret_paths
        if secret_paths is None:
            home = os.path.expanduser("~")
            secret_paths = tuple(p for p in (home, "/root", "/etc/shadow", "/etc/gshadow") if p not in ("", "/"))
        self._settings = {
            "wall_time_s": float(config.wall_time_s), "cpu_time_s": float(config.cpu_time_s),
            "memory_bytes": config.memory_bytes, "max_output_chars": config.max_output_chars,
            "capture_bytes": 4 * config.max_output_chars + 4096, "max_file_bytes": config.max_file_bytes,
            "max_open_files": config.max_open_files, "max_processes": config.max_processes,
            "preload": list(config.preload_modules), "isolate_network": config.isolate_network,
            "secret_paths": list(secret_paths), "root": self._root,
        }
        self._env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": self._root, "TMPDIR": self._root, "PYTHONHASHSEED": "0",  # same hashes on replay
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "NUMEXPR_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "MPLBACKEND": "Agg",
        }
        self._cond = threading.Condition()
        self._slots = threading.BoundedSemaphore(config.parallel)
        self._workers: list[_Worker] = []
        self._trajectories: dict[Hashable, _Trajectory] = {}
        self._counter = 0
        self._closed = False
        self._executor = None
        self._stats = {"workers_started": 0, "workers_lost": 0, "workers_retired": 0, "cells_run": 0,
                       "cells_replayed": 0, "evictions": 0}
        self._finalizer = weakref.finalize(self, _shutdown_pool, self._workers, self._root)
        try:
            with self._cond:
                for _ in range(config.parallel):  # warm up in the background: Popen does not wait
                    self._spawn_locked()
        except OSError as exc:
            self._finalizer()
            raise SandboxError(f"cannot start sandbox workers with {self._python!r}: {exc}") from exc

    # ---------------------------------------------------------------- public API

    def run(self, trajectory_id: Hashable, code: str) -> ExecResult:
        """Run one cell of `trajectory_id` (created on first use) and return what it produced."""
        if not isinstance(code, str):
            raise TypeError(f"code must be a str, got {type(code).__name__}")
        trajectory = self._trajectory(trajectory_id)
        with trajectory.lock:
            return self._run_locked(trajectory, code)

    def run_batch(self, calls: Iterable[tuple[Hashable, str]], *, progress: bool = False) -> list[ExecResult]:
        """Run many (trajectory_id, code) pairs concurrently; results come back in input order.

        Cells of different trajectories run in parallel on up to `config.parallel` workers; cells of
        the same trajectory run one after another in the order given.
        """
        from concurrent.futures import ThreadPoolExecutor

        calls = list(calls)
        groups: dict[Hashable, list[int]] = {}
        for position, call in enumerate(calls):
            if not (isinstance(call, tuple) and len(call) == 2):
                raise TypeError(f"calls[{position}] must be a (trajectory_id, code) tuple, got {call!r:.80}")
            if not isinstance(call[1], str):
                raise TypeError(f"calls[{position}][1] (code) must be a str, got {type(call[1]).__name__}")
            try:
                hash(call[0])
            except TypeError:
                raise TypeError(f"calls[{position}][0] (trajectory_id) must be hashable, "
                                f"got {type(call[0]).__name__}") from None
            groups.setdefault(call[0], []).append(position)
        results: list[ExecResult | None] = [None] * len(calls)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(calls), desc="sandbox", unit="cell")

        def run_group(positions: list[int]) -> None:
            for position in positions:
                results[position] = self.run(*calls[position])
                if bar is not None:
                    bar.update(1)

        with self._cond:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.config.parallel, thread_name_prefix="lmforge-sandbox")
            executor = self._executor
        try:
            for future in [executor.submit(run_group, positions) for positions in groups.values()]:
                future.result()
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    def close(self, trajectory_id: Hashable) -> None:
        """Forget a trajectory: free its namespace and delete its folder. Unknown ids are ignored."""
        import shutil

        with self._cond:
            trajectory = self._trajectories.get(trajectory_id)
        if trajectory is None:
            return
        with trajectory.lock:
            with self._cond:
                self._trajectories.pop(trajectory_id, None)
                worker = trajectory.worker
                trajectory.worker = None
                if worker is not None:
                    worker.owner = None
                    worker.busy = True
            if worker is not None:
                # Free the namespace's memory now rather than when the worker is next bound.
                try:
                    self._request(worker, {"op": "reset", "folder": None}, self.config.startup_timeout_s)
                except (_WorkerGone, _WorkerTimedOut):
                    self._discard(worker)
                self._release(worker)
            shutil.rmtree(trajectory.folder, ignore_errors=True)

    def folder(self, trajectory_id: Hashable) -> str:
        """The private folder (cwd) of a trajectory, created on first use."""
        return self._trajectory(trajectory_id).folder

    @property
    def stats(self) -> dict:
        """Counters (workers started, lost and retired; cells run and replayed; evictions), the live
        workers and open trajectories, and whether the started workers run without any network
        interface (an empty network namespace; needs root on Linux) besides the audit hook."""
        with self._cond:
            ready = [worker for worker in self._workers if worker.ready]
            return dict(self._stats, live_workers=len(self._workers), open_trajectories=len(self._trajectories),
                        network_isolated=bool(ready) and all(worker.network_isolated for worker in ready))

    def shutdown(self) -> None:
        """Kill every worker and delete all private folders. Idempotent."""
        with self._cond:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- internals

    def _trajectory(self, trajectory_id: Hashable) -> _Trajectory:
        try:
            hash(trajectory_id)
        except TypeError:
            raise TypeError(f"trajectory_id must be hashable, got {type(trajectory_id).__name__}") from None
        with self._cond:
            if self._closed:
                raise RuntimeError("this Sandbox has been shut down")
            trajectory = self._trajectories.get(trajectory_id)
            if trajectory is None:
                self._counter += 1
                folder = os.path.join(self._root, f"trajectory-{self._counter}")
                os.mkdir(folder, 0o700)
                trajectory = _Trajectory(trajectory_id, folder)
                self._trajectories[trajectory_id] = trajectory
            return trajectory

    def _run_locked(self, trajectory: _Trajectory, code: str) -> ExecResult:
        config = self.config
        cell_index = trajectory.next_cell
        trajectory.next_cell += 1
        with self._slots:
            started = time.monotonic()
            replayed = 0
            for attempt in range(2):
                worker, replayed_now = self._bind(trajectory)
                replayed += replayed_now
                try:
                    self._set_cpu_rlimit(worker, config.cpu_time_s)
                    reply = self._request(worker, {"op": "run", "cell": cell_index, "code": code},
                                          config.wall_time_s + config.kill_grace_s)
                    if "ok" not in reply or reply.get("kind") not in (None, *ERROR_KINDS):
                        raise _WorkerGone(f"bad reply: {str(reply)[:200]}")
                    ok, kind, error = bool(reply["ok"]), reply["kind"], reply["error"]
                    output, truncated = str(reply["output"]), bool(reply["truncated"])
                    worker.cells_run += 1
                    if ok:
                        trajectory.history.append((cell_index, code))
                except _WorkerDiedIdle:
                    # It died between calls (say, a thread of an earlier cell called os._exit): this
                    # cell never ran, so run it on a fresh worker instead of blaming it.
                    self._discard(worker)
                    if attempt == 0:
                        continue
                    ok, kind, truncated = False, "crash", False
                    error = "ProcessExit: the Python process keeps exiting between cells"
                    output = error + "\n"
                except (_WorkerGone, _WorkerTimedOut) as failure:
                    output, kind, error, truncated = self._lost_worker_report(worker, failure)
                    self._discard(worker)
                    ok = False
                finally:
                    trajectory.last_used = time.monotonic()
                    self._release(worker)
                break
            note = ""
            if trajectory.state_lost:
                trajectory.state_lost = False
                note = ("[sandbox] The variables of earlier cells could not be restored (re-running them failed); "
                        "this cell ran in a fresh namespace.\n")
            with self._cond:
                self._stats["cells_run"] += 1
            return ExecResult(trajectory.id, cell_index, note + output, ok, kind, error,
                              time.monotonic() - started, truncated, replayed)

    def _bind(self, trajectory: _Trajectory) -> tuple[_Worker, int]:
        """Get a worker holding `trajectory`'s state, rebuilding it (reset + replay) if needed."""
        for _ in range(4):
            with self._cond:
                while True:
                    if self._closed:
                        raise RuntimeError("this Sandbox has been shut down")
                    worker = trajectory.worker
                    if worker is not None and not worker.dead:
                        worker.busy = True
                        return worker, 0
                    worker = self._free_worker_locked()
                    if worker is not None:
                        break
                    self._cond.wait()
                worker.busy = True
                worker.owner, trajectory.worker = trajectory, worker
                recycle = worker.cells_run >= self.config.max_cells_per_worker or (
                    not self.config.reuse_workers and worker.trajectories_served > 0)
            try:
                if recycle:
                    self._discard(worker, lost=False)
                    self._release(worker)
                    continue
                self._await_ready(worker)
                clean = self._request(worker, {"op": "reset", "folder": trajectory.folder},
                                      self.config.startup_timeout_s).get("clean")
                if not clean:  # threads of the last trajectory still run: start from a new process
                    self._discard(worker, lost=False)
                    self._release(worker)
                    continue
                worker.trajectories_served += 1
                replayed = 0
                if trajectory.history:
                    replayed = self._replay(worker, trajectory)
                return worker, replayed
            except (_WorkerGone, _WorkerTimedOut):
                self._discard(worker)
                self._release(worker)
            except BaseException:
                self._discard(worker)
                self._release(worker)
                raise
        raise SandboxError("could not prepare a sandbox worker after 4 attempts")

    def _replay(self, worker: _Worker, trajectory: _Trajectory) -> int:
        """Rebuild state by re-running the trajectory's successful cells; returns how many ran.
        If the replay itself kills the worker, the trajectory continues from a fresh namespace."""
        cells = list(trajectory.history)
        self._set_cpu_rlimit(worker, self.config.cpu_time_s * len(cells))
        try:
            self._request(worker, {"op": "replay", "cells": cells},
                          self.config.wall_time_s * len(cells) + self.config.kill_grace_s)
            # A replayed cell may have broken the worker without failing itself (say, by closing its
            # pipes); check before running the new cell, or the history would poison every call.
            self._request(worker, {"op": "ping"}, self.config.startup_timeout_s)
        except (_WorkerGone, _WorkerTimedOut):
            trajectory.history.clear()  # cannot be restored; do not try again on every call
            trajectory.state_lost = True
            raise
        with self._cond:
            self._stats["cells_replayed"] += len(cells)
        return len(cells)

    def _free_worker_locked(self) -> _Worker | None:
        """An unowned idle worker, a new one, or one taken from the least recently used idle
        trajectory (whose state will be replayed when it runs again). Caller holds the lock."""
        for worker in self._workers:
            if worker.owner is None and not worker.busy and not worker.dead:
                return worker
        if len(self._workers) < self.config.num_workers:
            return self._spawn_locked()
        idle = [w for w in self._workers if not w.busy and not w.dead and w.owner is not None]
        if not idle:
            return None
        worker = min(idle, key=lambda w: w.owner.last_used)
        worker.owner.worker = None
        worker.owner = None
        self._stats["evictions"] += 1
        return worker

    def _spawn_locked(self) -> _Worker:
        import subprocess

        self._stats["workers_started"] += 1
        number = self._stats["workers_started"]
        capture_path = os.path.join(self._root, f"worker-{number}.out")
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        settings = dict(self._settings, capture_path=capture_path)
        try:
            with open(capture_path, "a+b") as capture:
                process = subprocess.Popen(
                    [self._python, "-s", "-B", _THIS_FILE, str(request_read), str(reply_write), json.dumps(settings)],
                    stdin=subprocess.DEVNULL, stdout=capture, stderr=subprocess.STDOUT,
                    pass_fds=(request_read, reply_write), env=self._env, cwd=self._root,
                    start_new_session=True, close_fds=True)
        except BaseException:
            for fd in (request_read, request_write, reply_read, reply_write):
                os.close(fd)
            raise
        os.close(request_read)
        os.close(reply_write)
        worker = _Worker(process, request_write, reply_read, capture_path)
        self._workers.append(worker)
        return worker

    def _await_ready(self, worker: _Worker) -> None:
        if worker.ready:
            return
        try:
            message = self._receive(worker, time.monotonic() + self.config.startup_timeout_s)
        except _WorkerTimedOut:
            raise SandboxError(f"a sandbox worker did not start within {self.config.startup_timeout_s} s") from None
        except _WorkerGone:
            log = self._read_capture(worker, 4000)
            raise SandboxError(f"a sandbox worker failed to start:\n{log}") from None
        if message.get("op") != "ready":
            raise _WorkerGone("no ready message")
        worker.ready = True
        worker.network_isolated = bool(message.get("network_isolated"))
        worker.preloaded = list(message.get("preloaded", []))
        worker.cpu_s = float(message.get("cpu_s", 0.0))

    def _request(self, worker: _Worker, message: dict, timeout: float) -> dict:
        self._await_ready(worker)
        if _has_exited(worker.pid):
            raise _WorkerDiedIdle("the worker had exited before the request")
        request_id = os.urandom(8).hex()
        data = json.dumps(dict(message, id=request_id)).encode("utf-8")
        try:
            _write_all(worker.request_fd, len(data).to_bytes(_HEADER_BYTES, "big") + data)
        except OSError:  # it died before reading the request
            raise _WorkerDiedIdle("could not send to the worker") from None
        reply = self._receive(worker, time.monotonic() + timeout)
        if not isinstance(reply, dict) or reply.get("id") != request_id:
            raise _WorkerGone("malformed or out-of-order reply (did the cell write to the sandbox's pipes?)")
        worker.cpu_s = float(reply.get("cpu_s", worker.cpu_s))
        return reply

    def _receive(self, worker: _Worker, deadline: float) -> dict:
        try:
            size = int.from_bytes(_read_exact(worker.reply_fd, _HEADER_BYTES, deadline), "big")
            if size > _MAX_MESSAGE_BYTES:
                raise _WorkerGone("oversized reply")
            return json.loads(_read_exact(worker.reply_fd, size, deadline))
        except TimeoutError:
            self._kill(worker)
            raise _WorkerTimedOut from None
        except EOFError:
            raise _WorkerGone("the worker closed its pipe", closed=True) from None
        except (OSError, ValueError):  # ValueError: the reply was not JSON
            raise _WorkerGone("the worker broke the protocol") from None

    def _set_cpu_rlimit(self, worker: _Worker, budget_s: float) -> None:
        """Hard backstop for the in-process CPU timer: RLIMIT_CPU counts the worker's whole life,
        so the soft limit is moved to (CPU used so far + this call's budget + slack) per call."""
        import resource

        soft = int(math.ceil(worker.cpu_s + budget_s + self.config.kill_grace_s)) + 1
        try:
            _, hard = resource.prlimit(worker.pid, resource.RLIMIT_CPU)
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            resource.prlimit(worker.pid, resource.RLIMIT_CPU, (soft, hard))
        except (OSError, ValueError, AttributeError):
            pass  # not Linux or the worker is gone; the wall-time kill still applies

    def _kill(self, worker: _Worker) -> None:
        if worker.process.returncode is not None:
            return  # reaped: its pid (and so its process group id) may belong to someone else now
        if not _has_exited(worker.pid):
            worker.killed_by_host = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.pid, signal.SIGKILL)  # the whole group, in case anything escaped the hook

    def _stop(self, worker: _Worker, wait_for_exit_s: float = 0.0) -> None:
        """Make sure the worker and its process group are dead, then reap it. With
        `wait_for_exit_s`, first give a dying worker that long to exit by itself, so that its exit
        status (not our SIGKILL) is what gets reported."""
        if worker.process.returncode is not None:
            return
        deadline = time.monotonic() + wait_for_exit_s
        while not _has_exited(worker.pid) and time.monotonic() < deadline:
            time.sleep(0.005)
        self._kill(worker)  # not reaped yet, so the group id is still ours
        with contextlib.suppress(Exception):  # SIGKILLed; only an unkillable (D-state) process lands here
            worker.process.wait(timeout=30)

    def _lost_worker_report(self, worker: _Worker, failure: Exception) -> tuple[str, str, str, bool]:
        """Output, error kind, error line and truncation flag for a call whose worker was lost."""
        config = self.config
        self._stop(worker, wait_for_exit_s=2.0 if getattr(failure, "closed", False) else 0.0)
        printed = _clean_crash_log(self._read_capture(worker, 4 * config.max_output_chars + 4096))
        code = worker.process.returncode
        restore = "Variables from earlier successful cells will be restored on the next call."
        if isinstance(failure, _WorkerTimedOut):
            kind = "timeout"
            error = (f"TimeoutError: the cell exceeded the wall-time limit of {config.wall_time_s:g} s "
                     "and its process was killed")
        elif code is not None and code < 0:
            name = _signal_name(-code)
            meaning = _SIGNAL_MEANING.get(name, "killed by a signal")
            if name == "SIGXCPU":
                kind = "timeout"
                error = f"TimeoutError: the cell exceeded the CPU-time limit of {config.cpu_time_s:g} s"
            elif name == "SIGKILL" and "MemoryError" in printed:
                kind, error = "memory", "MemoryError: the process ran out of memory and was killed"
            else:
                kind = "memory" if "std::bad_alloc" in printed or "Cannot allocate memory" in printed else "crash"
                error = f"ProcessCrash: the Python process died ({name}: {meaning}) while running the cell"
        else:
            kind = "crash"
            error = f"ProcessExit: the Python process exited with status {code} while running the cell"
        text, truncated = _compose_output(printed, len(printed), f"{error}\n{restore}\n", config.max_output_chars)
        return _clean_text(text), kind, error, truncated

    def _read_capture(self, worker: _Worker, limit: int) -> str:
        try:
            with open(worker.capture_path, "rb") as capture:
                return capture.read(limit).decode("utf-8", "replace")
        except OSError:
            return ""

    def _discard(self, worker: _Worker, lost: bool = True) -> None:
        """Kill a worker, forget it, and start a replacement so the pool keeps its warm size.
        `lost`: it died or misbehaved (counted in stats), rather than being retired on purpose."""
        self._stop(worker)
        for fd in (worker.request_fd, worker.reply_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(worker.capture_path)
        with self._cond:
            if worker.dead:
                return
            worker.dead = True
            if worker.owner is not None:
                worker.owner.worker = None
                worker.owner = None
            if worker in self._workers:
                self._workers.remove(worker)
            self._stats["workers_lost" if lost else "workers_retired"] += 1
            if not self._closed and len(self._workers) < self.config.parallel:
                self._spawn_locked()
            self._cond.notify_all()

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            worker.busy = False
            self._cond.notify_all()


def _shutdown_pool(workers: list[_Worker], root: str) -> None:
    """Kill all workers and delete the folders (also run by the finalizer at exit)."""
    import shutil

    for worker in list(workers):
        if worker.process.returncode is None:  # not reaped, so the group id is still ours
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.pid, signal.SIGKILL)
    for worker in list(workers):
        with contextlib.suppress(Exception):
            worker.process.wait(timeout=10)
        for fd in (worker.request_fd, worker.reply_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        worker.dead = True
    workers.clear()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
