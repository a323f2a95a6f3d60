"""Signed commands: the envelope, the verifier's attack table, the replay cache across
restarts, the fuzzed parser, the CDDL, and the fleet-side CLI."""

from __future__ import annotations

import os
import random
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pycddl
import pytest

from agent.commands.envelope import MAX_ENVELOPE, REASONS, STATUSES, Command, result_message
from agent.commands.journal import ReplayCache
from agent.commands.verifier import Verifier
from agent.errors import CommandRejected
from agent.fleet.signing import default_kid, generate_key_pair, sign_command

REPO = Path(__file__).resolve().parents[1]
WIRE_CDDL = (REPO / "docs" / "wire.cddl").read_text()
DEVICE = "bike-0001"
NOW = 1_800_000_000
SKEW = 30.0
KEY_A = generate_key_pair()
KEY_B = generate_key_pair()
KEY_OLD = generate_key_pair()
KEY_STRANGER = generate_key_pair()


def sign(name: str = "lock", args: dict[str, Any] | None = None, *, key: tuple[bytes, bytes] = KEY_A,
         kid: str = "fleet-a", device: str = DEVICE, iat: int = NOW, exp: int = NOW + 300,
         cid: str | None = None) -> bytes:
    return sign_command(key[0], kid, device, name, args or {}, iat, exp, cid)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "outbox.sqlite")


@pytest.fixture
def cache(db: str) -> Iterator[ReplayCache]:
    rc = ReplayCache(db)
    yield rc
    rc.close()


def make_verifier(cache: ReplayCache) -> Verifier:
    return Verifier(DEVICE, {"fleet-a": KEY_A[1], "fleet-b": KEY_B[1], "fleet-old": KEY_OLD[1].decode()},
                      {"fleet-old", "fleet-gone"}, SKEW, cache)


@pytest.fixture
def verifier(cache: ReplayCache) -> Verifier:
    return make_verifier(cache)


def test_round_trip(verifier: Verifier, cache: ReplayCache) -> None:
    cmd = verifier.verify(sign("set_speed_limit", {"kmh": 20}, cid="cmd-1"), NOW + 1)
    assert cmd == Command("cmd-1", DEVICE, "set_speed_limit", {"kmh": 20.0, "allow_above_legal": False},
                            NOW, NOW + 300, "fleet-a")
    assert len(cache) == 1 and cache.seen("cmd-1")


@pytest.mark.parametrize("name, args", [
    ("ping", {}), ("lock", {}), ("unlock", {}), ("snapshot", {}), ("diagnostics", {}), ("restart_agent", {}),
    ("set_speed_limit", {"kmh": 5}), ("set_speed_limit", {"kmh": 25.0}),
    ("set_speed_limit", {"kmh": 45, "allow_above_legal": True}),
    ("set_speed_limit", {"kmh": 12.5, "allow_above_legal": False}),
    ("set_reporting", {"signals": {"Vehicle.Speed": {"mode": "change", "deadband": 0.5}}}),
    ("set_config", {"patch": {"windows": {"live": 2.0}}}),
])
def test_every_known_command_verifies(verifier: Verifier, name: str, args: dict[str, Any]) -> None:
    assert verifier.verify(sign(name, args), NOW).name == name


def resign_with(envelope: bytes, **changes: Any) -> bytes:
    """The same command with payload fields changed and the ORIGINAL signature kept."""
    tag = cbor2.loads(envelope)
    protected, unprotected, payload, signature = tag.value
    body = dict(cbor2.loads(payload))
    body.update(changes)
    return bytes(cbor2.dumps(cbor2.CBORTag(18, [protected, {}, cbor2.dumps(body), signature])))


def _replace(envelope: bytes, index: int, value: Any) -> bytes:
    items = list(cbor2.loads(envelope).value)
    items[index] = value
    return bytes(cbor2.dumps(cbor2.CBORTag(18, items)))


GOOD = sign(cid="attack")
ATTACKS: list[tuple[str, bytes, float, str | None]] = [
    # (reason, envelope, now, command id the rejection must carry)
    ("too_large", sign("lock", {"pad": "x" * 5000}, cid="big"), NOW, None),
    ("malformed", b"\xff\x00garbage", NOW, None),
    ("malformed", b"", NOW, None),
    ("malformed", GOOD + b"\x00", NOW, None),                                      # trailing byte
    ("malformed", bytes(cbor2.dumps(list(cbor2.loads(GOOD).value))), NOW, None),   # untagged
    ("malformed", _replace(GOOD, 1, {4: b"fleet-a"}), NOW, "attack"),              # unprotected header
    ("malformed", _replace(GOOD, 3, b"\x00" * 63), NOW, "attack"),                 # short signature
    ("malformed", _replace(GOOD, 0, cbor2.dumps({1: -7, 4: b"fleet-a"})), NOW, "attack"),  # ES256
    ("malformed", resign_with(GOOD, kid="fleet-b"), NOW, "attack"),               # kid mismatch
    ("malformed", resign_with(GOOD, exp=NOW - 1), NOW, "attack"),                 # exp before iat
    ("malformed", resign_with(GOOD, iat=-5), NOW, "attack"),
    ("malformed", resign_with(GOOD, id="x" * 65), NOW, None),
    ("malformed", resign_with(GOOD, extra=1), NOW, "attack"),
    ("malformed", resign_with(GOOD, args=[1]), NOW, "attack"),
    ("unknown_key", sign(key=KEY_STRANGER, kid="stranger", cid="k"), NOW, "k"),
    ("revoked_key", sign(key=KEY_OLD, kid="fleet-old", cid="r"), NOW, "r"),
    ("revoked_key", sign(key=KEY_STRANGER, kid="fleet-gone", cid="r2"), NOW, "r2"),
    ("bad_signature", sign(key=KEY_STRANGER, kid="fleet-a", cid="s"), NOW, "s"),    # forged with another key
    ("bad_signature", resign_with(sign("set_speed_limit", {"kmh": 20}, cid="t"), args={"kmh": 45}), NOW, "t"),
    ("bad_signature", resign_with(GOOD, dev="bike-0002"), NOW, "attack"),
    ("bad_signature", _replace(GOOD, 3, bytes(64)), NOW, "attack"),
    ("wrong_device", sign(device="bike-0002", cid="d"), NOW, "d"),
    ("expired", sign(exp=NOW + 10, cid="e"), NOW + 10 + SKEW + 1, "e"),
    ("not_yet_valid", sign(iat=NOW + 100, exp=NOW + 400, cid="f"), NOW + 100 - SKEW - 1, "f"),
    ("unknown_command", sign("self_destruct", cid="u3"), NOW, "u3"),
    ("bad_arguments", sign("set_config", {"patch": {}}, cid="c1"), NOW, "c1"),
    ("bad_arguments", sign("set_config", {"patch": {"device_id": "bike-0002"}}, cid="c2"), NOW, "c2"),
    ("bad_arguments", sign("set_config", {"patch": {"outbox": {"path": "/tmp/x"}}}, cid="c3"), NOW, "c3"),
    ("bad_arguments", sign("set_config", {"patch": [1]}, cid="c4"), NOW, "c4"),
    ("bad_arguments", sign("set_reporting", {}, cid="r1"), NOW, "r1"),
    ("bad_arguments", sign("set_reporting", {"signals": {"Vehicle.Nothing": {"mode": "change"}}}, cid="r3"),
     NOW, "r3"),
    ("bad_arguments", sign("set_reporting", {"signals": {"Vehicle.Speed": {"mode": "often"}}}, cid="r4"),
     NOW, "r4"),
    ("bad_arguments", sign("set_reporting", {"signals": {"Vehicle.Speed": {"mode": "change", "deadband": -1}}},
                           cid="r5"), NOW, "r5"),
    ("bad_arguments", sign("lock", {"now": True}, cid="a1"), NOW, "a1"),
    ("bad_arguments", sign("set_speed_limit", {"kmh": 30}, cid="a2"), NOW, "a2"),
    ("bad_arguments", sign("set_speed_limit", {"kmh": 4.9}, cid="a3"), NOW, "a3"),
    ("bad_arguments", sign("set_speed_limit", {"kmh": 46, "allow_above_legal": True}, cid="a4"), NOW, "a4"),
    ("bad_arguments", sign("set_speed_limit", {"kmh": True}, cid="a5"), NOW, "a5"),
    ("bad_arguments", sign("set_speed_limit", {"kmh": 20, "allow_above_legal": 1}, cid="a6"), NOW, "a6"),
    ("bad_arguments", sign("set_speed_limit", {}, cid="a7"), NOW, "a7"),
    ("bad_arguments", sign("set_speed_limit", {"kmh": 20, "mph": 12}, cid="a8"), NOW, "a8"),
]


@pytest.mark.parametrize("reason, envelope, now, command_id", ATTACKS,
                         ids=[f"{a[0]}-{i}" for i, a in enumerate(ATTACKS)])
def test_attack_is_rejected_and_leaves_no_trace(verifier: Verifier, cache: ReplayCache, reason: str,
                                                envelope: bytes, now: float, command_id: str | None) -> None:
    with pytest.raises(CommandRejected) as info:
        verifier.verify(envelope, now)
    assert (info.value.reason, info.value.command_id) == (reason, command_id)
    assert len(cache) == 0, "a rejected command must not enter the replay cache"
    assert verifier.rejected[reason] == 1


def test_every_reason_is_in_the_attack_table() -> None:
    assert {a[0] for a in ATTACKS} | {"replayed"} == set(REASONS)


def test_replay_is_rejected(verifier: Verifier, cache: ReplayCache) -> None:
    env = sign("unlock", cid="once")
    verifier.verify(env, NOW)
    with pytest.raises(CommandRejected) as info:
        verifier.verify(env, NOW + 5)
    assert (info.value.reason, info.value.command_id) == ("replayed", "once")
    # A different envelope with the same id (re-signed, even with another key) is a replay too.
    with pytest.raises(CommandRejected, match="replayed"):
        verifier.verify(sign("ping", key=KEY_B, kid="fleet-b", cid="once"), NOW + 6)
    assert len(cache) == 1


def test_replay_after_restart(db: str) -> None:
    env = sign("lock", cid="survives")
    first = ReplayCache(db)
    make_verifier(first).verify(env, NOW)
    first.close()
    again = ReplayCache(db)
    try:
        with pytest.raises(CommandRejected, match="replayed"):
            make_verifier(again).verify(env, NOW + 60)
    finally:
        again.close()


def test_replay_cache_shares_the_outbox_file(db: str) -> None:
    """The table lives beside the outbox's own, in the same SQLite file."""
    from agent.store.outbox import Outbox
    outbox = Outbox(db, 10_000_000)
    rc = ReplayCache(db)
    try:
        outbox.append([(0, 1.0, b"x")])
        assert rc.remember("a", NOW + 10)
        assert (rc.db.execute("PRAGMA synchronous").fetchone()[0], rc.db.execute("PRAGMA journal_mode").fetchone()[0]) \
            == (2, "wal")
        tables = {r[0] for r in outbox.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"records", "command_ids"} <= tables
    finally:
        rc.close()


def test_replay_cache_keeps_until_expiry_then_prunes(cache: ReplayCache) -> None:
    assert cache.remember("a", NOW + 10)
    assert not cache.remember("a", NOW + 10)
    assert cache.remember("b", NOW + 100, now=NOW + 10)   # "a" expires at NOW + 10: not before it
    assert cache.seen("a")
    assert cache.prune(NOW + 11) == 1
    assert not cache.seen("a") and cache.seen("b")


def test_expired_ids_are_pruned_only_when_the_command_is_dead(verifier: Verifier, cache: ReplayCache) -> None:
    env = sign("ping", cid="p", exp=NOW + 60)
    verifier.verify(env, NOW)
    verifier.verify(sign("ping", cid="q", exp=NOW + 600), NOW + 60 + SKEW)  # prunes nothing yet
    with pytest.raises(CommandRejected, match="replayed"):
        verifier.verify(env, NOW + 60 + SKEW)
    verifier.verify(sign("ping", cid="r", exp=NOW + 600), NOW + 60 + SKEW + 1)  # now "p" goes
    assert not cache.seen("p")
    with pytest.raises(CommandRejected, match="expired"):
        verifier.verify(env, NOW + 60 + SKEW + 1)


def test_key_rotation(verifier: Verifier) -> None:
    assert verifier.verify(sign(key=KEY_A, kid="fleet-a", cid="1"), NOW).kid == "fleet-a"
    assert verifier.verify(sign(key=KEY_B, kid="fleet-b", cid="2"), NOW).kid == "fleet-b"
    with pytest.raises(CommandRejected, match="bad_signature"):
        verifier.verify(sign(key=KEY_A, kid="fleet-b", cid="3"), NOW)


def test_revoked_key_even_while_still_configured(cache: ReplayCache) -> None:
    v = make_verifier(cache)
    assert "fleet-old" in v.keys
    with pytest.raises(CommandRejected) as info:
        v.verify(sign(key=KEY_OLD, kid="fleet-old", cid="old"), NOW)
    assert info.value.reason == "revoked_key"
    assert len(cache) == 0


@pytest.mark.parametrize("now, ok", [
    (NOW - SKEW, True),            # issued "in the future" by exactly the skew
    (NOW - SKEW - 0.001, False),   # ... by a hair more
    (NOW + 300 + SKEW, True),      # expired by exactly the skew
    (NOW + 300 + SKEW + 0.001, False),
])
def test_clock_skew_edges(verifier: Verifier, now: float, ok: bool) -> None:
    env = sign(iat=NOW, exp=NOW + 300)
    if ok:
        verifier.verify(env, now)
    else:
        with pytest.raises(CommandRejected) as info:
            verifier.verify(env, now)
        assert info.value.reason == ("not_yet_valid" if now < NOW else "expired")


def test_exactly_max_size_is_parsed(verifier: Verifier) -> None:
    pad = 0
    for _ in range(5):   # CBOR length heads grow with the pad: converge on the bound
        env = sign("lock", {"pad": "x" * pad}, cid="size")
        pad += MAX_ENVELOPE - len(env)
    assert len(env) == MAX_ENVELOPE
    with pytest.raises(CommandRejected, match="bad_arguments"):  # parsed and verified, not too_large
        verifier.verify(env, NOW)


def test_result_messages_match_the_cddl() -> None:
    schema = pycddl.Schema("root = command-result\n" + WIRE_CDDL)
    for status in STATUSES:
        msg = result_message("id-1", status, "expired" if status == "rejected" else "",
                               {"received": NOW + 0.5, status: NOW + 1.25})
        schema.validate_cbor(msg)
        decoded = cbor2.loads(msg)
        assert decoded["status"] == status and decoded["t"]["received"] == (NOW + 0.5) * 1000
    schema.validate_cbor(result_message(None, "rejected", "malformed", {"received": NOW}))
    with pytest.raises(ValueError):
        result_message("x", "done", "", {})
    with pytest.raises(ValueError):
        result_message("x", "executed", "", {"later": NOW})


def test_signed_envelopes_match_the_cddl() -> None:
    """pycddl 0.6 cannot follow ``.cbor`` inside an array: check the outer shape here and
    the embedded protected header and payload against their rules."""
    protected_rule = pycddl.Schema("root = command-protected\n" + WIRE_CDDL)
    payload_rule = pycddl.Schema("root = command-payload\n" + WIRE_CDDL)
    for name, args in [("lock", {}), ("set_speed_limit", {"kmh": 20}),
                       ("set_speed_limit", {"kmh": 30.5, "allow_above_legal": True}),
                       ("set_reporting", {"signals": {"Vehicle.Speed": {"mode": "both", "deadband": 0.5}}}),
                       ("set_config", {"patch": {"windows": {"live": 2.0}, "sources": [{"name": "x"}]}})]:
        tag = cbor2.loads(sign(name, args))
        assert tag.tag == 18 and len(tag.value) == 4 and tag.value[1] == {} and len(tag.value[3]) == 64
        protected_rule.validate_cbor(tag.value[0])
        payload_rule.validate_cbor(tag.value[2])
    with pytest.raises(pycddl.ValidationError):
        payload_rule.validate_cbor(cbor2.loads(sign("set_config", {})).value[2])
    with pytest.raises(pycddl.ValidationError):
        payload_rule.validate_cbor(cbor2.loads(sign("self_destruct", {})).value[2])


def _mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[pos % len(data)] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[pos % len(data)] = rng.choice((0x00, 0x17, 0x18, 0x1f, 0x40, 0x5f, 0x7f, 0x9f, 0xbf, 0xd2, 0xf6,
                                                0xfb, 0xff, rng.randrange(256)))
        elif op == 2:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and data:
            del data[pos:pos + rng.randint(1, 8)]
        else:
            data = data[:pos]
    return bytes(data)


def test_fuzz_the_envelope_parser(tmp_path: Path) -> None:
    """>= 100,000 random and mutated envelopes, time-bounded: only CommandRejected escapes,
    and nothing but the unmutated seeds is accepted."""
    cache = ReplayCache(str(tmp_path / "fuzz.sqlite"))
    verifier = make_verifier(cache)
    rng = random.Random(7)
    seeds = [sign(n, a, cid=f"seed-{i}") for i, (n, a) in enumerate(
        [("lock", {}), ("set_speed_limit", {"kmh": 20.5, "allow_above_legal": False}), ("ping", {})])]
    seeds += [resign_with(seeds[0], args={"a": [1, {"b": b"x"}], "c": -1.5}),
              bytes(cbor2.dumps([[[[[[[[[[[]]]]]]]]]]])), bytes(cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"", b""])))]
    seed_set = set(seeds)
    deadline = time.monotonic() + 60.0  # stops a hang only: ~10 s alone, more beside other workers
    n = 0
    accepted: list[bytes] = []
    while n < 100_000 and time.monotonic() < deadline:
        data = os.urandom(rng.randrange(64)) if n % 10 == 0 else _mutate(rng, rng.choice(seeds))
        try:
            verifier.verify(data, NOW)
            accepted.append(data)
        except CommandRejected as e:
            assert e.reason in REASONS
        n += 1
    cache.close()
    assert n >= 100_000, f"only {n} inputs in the time bound"
    # What still verifies is an unmutated signed seed (the parser accepts no other
    # encoding of it), and each of those once at most.
    assert set(accepted) <= seed_set and len(accepted) == len(set(accepted))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60)


def test_cli_keys_generate_and_command_sign(tmp_path: Path, cache: ReplayCache) -> None:
    keys = tmp_path / "keys"
    gen = _cli("keys", "generate", "--out", str(keys), "--kid", "fleet-2026")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip() == "fleet-2026"
    private, public = keys / "fleet-2026.key.pem", keys / "fleet-2026.pub.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    again = _cli("keys", "generate", "--out", str(keys), "--kid", "fleet-2026")
    assert again.returncode == 2 and "never overwritten" in again.stderr

    signed = _cli("command", "sign", "--key", str(private), "--kid", "fleet-2026", "--device", DEVICE,
                  "--ttl", "120", "set_speed_limit", "kmh=30", "allow_above_legal=true")
    assert signed.returncode == 0, signed.stderr
    verifier = Verifier(DEVICE, {"fleet-2026": public.read_bytes()}, set(), SKEW, cache)
    cmd = verifier.verify(bytes.fromhex(signed.stdout.strip()), time.time())
    assert (cmd.name, cmd.args) == ("set_speed_limit", {"kmh": 30.0, "allow_above_legal": True})
    assert cmd.expires_at - cmd.issued_at == 120

    out = tmp_path / "cmd.cose"
    to_file = _cli("command", "sign", "--key", str(private), "--kid", "fleet-2026", "--device", DEVICE,
                   "--id", "lock-42", "--out", str(out), "lock")
    assert to_file.returncode == 0 and to_file.stdout == ""
    assert verifier.verify(out.read_bytes(), time.time()).id == "lock-42"

    refused = _cli("command", "sign", "--key", str(private), "--kid", "fleet-2026", "--device", DEVICE,
                   "set_speed_limit", "kmh=30")
    assert refused.returncode == 1 and "bad_arguments" in refused.stderr and refused.stdout == ""


def test_cli_default_kid_is_derived_from_the_key(tmp_path: Path) -> None:
    gen = _cli("keys", "generate", "--out", str(tmp_path), "--json")
    assert gen.returncode == 0, gen.stderr
    import json
    info = json.loads(gen.stdout)
    assert info["kid"] == default_kid(Path(info["public"]).read_bytes())


def test_argument_words() -> None:
    from agent.cli.command import parse_arguments
    assert parse_arguments(["a=1", "b=2.5", "c=true", "d=false", "e=fast", "f=", "g=nan", "h=a=b"]) == \
        {"a": 1, "b": 2.5, "c": True, "d": False, "e": "fast", "f": "", "g": "nan", "h": "a=b"}
    from agent.errors import ConfigError
    for bad in (["novalue"], ["=1"], ["a=1", "a=2"]):
        with pytest.raises(ConfigError):
            parse_arguments(bad)


def test_command_send_publishes_with_an_expiry(tmp_path: Path, mosquitto: Any) -> None:
    """``command send`` signs and publishes on <prefix><device>/cmd (QoS 1, with an MQTT 5
    message expiry set from the command's own), and what arrives verifies on the device."""
    import threading

    from agent.fleet.subscriber import Subscriber

    keydir = tmp_path / "keys"
    gen = subprocess.run([sys.executable, "-m", "agent", "keys", "generate", "--out", str(keydir), "--kid", "fleet1"],
                         capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    got: list[bytes] = []
    sub = Subscriber("cmd-watch", mosquitto.host, mosquitto.port, "ebike/v1/bike-9/cmd", lambda t, p: got.append(p))
    sub.connect()
    stop = threading.Event()
    loop = threading.Thread(target=lambda: [sub.loop(0.05) for _ in iter(stop.is_set, True)], daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while not sub.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the SUBACK
        out = subprocess.run([sys.executable, "-m", "agent", "command", "send", "--broker", mosquitto.address,
                              "--key", str(keydir / "fleet1.key.pem"), "--kid", "fleet1", "--device", "bike-9",
                              "--ttl", "60", "set_speed_limit", "kmh=20"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        loop.join(5)
        sub.close()
    assert len(got) == 1
    verifier = Verifier("bike-9", {"fleet1": (keydir / "fleet1.pub.pem").read_bytes()}, (), 5.0,
                          ReplayCache(str(tmp_path / "replay.sqlite")))
    cmd = verifier.verify(got[0], time.time())
    assert (cmd.name, cmd.args) == ("set_speed_limit", {"kmh": 20.0, "allow_above_legal": False})
