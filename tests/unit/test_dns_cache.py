"""The fast path on plain bytes: query recognition, TTL offsets, splicing, truncation, LRU."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.name
import dns.rrset
from chroot_helper.services.dns.cache import AnswerCache, make_entry, render
from chroot_helper.services.dns.wire import (
    find_ttl_offsets,
    parse_plain_query,
    question_key,
)
from hypothesis import given
from hypothesis import strategies as st


def response_wire(name="www.example.test", ttl=300, records=1):
    query = dns.message.make_query(name, "A")
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    response.answer.append(
        dns.rrset.from_text_list(
            name + ".", ttl, "IN", "A", [f"192.0.2.{i + 1}" for i in range(records)]
        )
    )
    response.authority.append(
        dns.rrset.from_text("example.test.", ttl + 50, "IN", "NS", "ns.test.")
    )
    response.use_edns(False)
    return response.to_wire(), qend(name)


def qend(name):
    return 12 + len(dns.message.make_query(name, "A").question[0].name.to_wire()) + 4


def entry_for(name="www.example.test", ttl=300, records=1, now=1000.0):
    wire, _ = response_wire(name, ttl, records)
    return make_entry(wire, qend(name), lifetime=ttl, now=now)


def test_plain_query_recognised_with_and_without_edns():
    plain = parse_plain_query(dns.message.make_query("WWW.Example.test", "AAAA").to_wire())
    assert plain is not None and not plain.edns and plain.udp_size == 512 and plain.rd
    assert plain.key == question_key(b"\x03www\x07example\x04test\x00", 28, 1)
    edns = parse_plain_query(
        dns.message.make_query("a.test", "A", use_edns=0, payload=4096).to_wire()
    )
    assert edns is not None and edns.edns and edns.udp_size == 4096


def test_key_lowercases_name_but_not_type():
    # QTYPE 65 is b"\x00A"; lower-casing it would collide with type 97.
    https = parse_plain_query(dns.message.make_query("a.test", 65).to_wire())
    other = parse_plain_query(dns.message.make_query("a.test", 97).to_wire())
    assert https is not None and other is not None and https.key != other.key


def test_non_plain_packets_go_to_slow_path():
    wire, _ = response_wire()
    assert parse_plain_query(wire) is None  # QR set
    query = dns.message.make_query("a.test", "A", use_edns=1)
    assert parse_plain_query(query.to_wire()) is None  # EDNS version 1
    assert parse_plain_query(dns.message.make_query("a.test", "A").to_wire() + b"x") is None


@given(st.binary(max_size=600))
def test_random_bytes_never_raise(data):
    parse_plain_query(data)


def test_ttl_offsets_point_at_ttls():
    wire, _ = response_wire(ttl=1234)
    offsets = find_ttl_offsets(wire)
    assert [struct.unpack_from("!I", wire, o)[0] for o in offsets] == [1234, 1284]


def test_render_patches_id_question_case_and_ttls():
    entry = entry_for(ttl=300, now=1000.0)
    query = dns.message.make_query("WWW.example.TEST", "A", id=777)
    plain = parse_plain_query(query.to_wire())
    out = render(entry, query.to_wire(), plain, now=1007.9, udp_limit=1232, edns_udp_size=1232)
    message = dns.message.from_wire(out)
    assert message.id == 777
    assert query.is_response(message)
    assert message.question[0].name.to_text() == "WWW.example.TEST."
    assert message.answer[0].ttl == 293
    assert message.authority[0].ttl == 343
    assert message.edns == -1


def test_render_adds_opt_for_edns_clients_and_truncates():
    entry = entry_for(records=40)
    query = dns.message.make_query("www.example.test", "A")
    plain = parse_plain_query(query.to_wire())
    out = render(entry, query.to_wire(), plain, now=1000.0, udp_limit=1232, edns_udp_size=1232)
    small = dns.message.from_wire(out)
    assert small.flags & dns.flags.TC and not small.answer and len(out) <= 512
    edns_query = dns.message.make_query("www.example.test", "A", use_edns=0, payload=1232)
    plain = parse_plain_query(edns_query.to_wire())
    out = render(entry, edns_query.to_wire(), plain, now=1000.0, udp_limit=1232, edns_udp_size=1232)
    full = dns.message.from_wire(out)
    assert not full.flags & dns.flags.TC and len(full.answer[0]) == 40 and full.edns == 0
    tcp = render(
        entry,
        query.to_wire(),
        parse_plain_query(query.to_wire()),
        now=1000.0,
        udp_limit=None,
        edns_udp_size=1232,
    )
    assert len(dns.message.from_wire(tcp).answer[0]) == 40


def test_cache_expiry_and_lru():
    cache = AnswerCache(2)
    for index, name in enumerate(["a.test", "b.test", "c.test"]):
        cache.put(name.encode(), entry_for(name, ttl=10 + index, now=0.0))
    assert cache.get(b"a.test", 1.0) is None  # evicted
    assert cache.get(b"b.test", 10.9) is not None
    assert cache.get(b"b.test", 11.0) is None  # expired at stored_at + lifetime
    assert len(cache) == 1
    cache.put(b"zero", entry_for("z.test", ttl=0, now=0.0))
    assert cache.get(b"zero", 0.0) is None
    assert AnswerCache(0).get(b"x", 0.0) is None


def remembered(cache, name="www.example.test", now=1000.0, query_id=1):
    """Store an entry for ``name``, render a reply to a plain query and remember it."""
    key = question_key(dns.name.from_text(name).to_wire(), 1, 1)
    entry = cache.get(key, now) or entry_for(name, ttl=300, now=now)
    cache.put(key, entry)
    query = dns.message.make_query(name, "A", id=query_id).to_wire()
    plain = parse_plain_query(query)
    reply = render(entry, query, plain, now=now, udp_limit=1232, edns_udp_size=1232)
    cache.remember(query, key, reply, now)
    return key, query, reply


def with_id(wire, query_id):
    return struct.pack("!H", query_id) + wire[2:]


def test_replay_answers_same_bytes_with_the_new_id_while_ttls_hold():
    cache = AnswerCache(10)
    _key, query, reply = remembered(cache, now=1000.0)
    again = with_id(query, 4242)
    assert cache.replay(again, 1000.9) == with_id(reply, 4242)
    # One second older: the TTLs shown change, so the reply is rendered again.
    assert cache.replay(again, 1001.0) is None
    assert cache.replay(again, 1000.5) is None  # and it was forgotten


def test_replay_needs_identical_query_bytes():
    cache = AnswerCache(10)
    _key, query, _reply = remembered(cache)
    upper = dns.message.make_query("WWW.example.test", "A", id=1).to_wire()
    no_rd = bytearray(query)
    no_rd[2] &= ~0x01
    edns = dns.message.make_query("www.example.test", "A", id=1, use_edns=0).to_wire()
    for other in (upper, bytes(no_rd), edns):
        assert cache.replay(other, 1000.0) is None


def test_replay_stops_when_the_entry_is_gone_or_replaced():
    cache = AnswerCache(1)
    key, query, _reply = remembered(cache, "a.test")
    remembered(cache, "b.test")  # evicts a.test
    assert cache.replay(query, 1000.0) is None
    key, query, _reply = remembered(cache, "a.test")
    cache.put(key, entry_for("a.test", ttl=300, now=1000.0))  # a fresh entry, same question
    assert cache.replay(query, 1000.0) is None
    key, query, _reply = remembered(cache, "a.test")
    cache.clear()
    assert cache.replay(query, 1000.0) is None


def test_replay_stops_at_expiry_and_keeps_lru_order():
    cache = AnswerCache(2)
    key_a, query_a, _ = remembered(cache, "a.test", now=0.0)
    remembered(cache, "b.test", now=0.0)
    assert cache.replay(query_a, 0.5) is not None  # a.test is now the most recently used
    remembered(cache, "c.test", now=0.5)  # evicts b.test, not a.test
    assert cache.get(key_a, 0.5) is not None
    expiring = AnswerCache(2)
    key, query, reply = remembered(expiring, "d.test", now=0.0)
    expiring.put(key, entry_for("d.test", ttl=1, now=0.0))
    expiring.remember(query, key, reply, 0.0)
    assert expiring.replay(query, 0.99) is not None
    assert expiring.replay(query, 1.0) is None


def test_remember_is_bounded_and_needs_a_cached_entry():
    cache = AnswerCache(1)
    query = dns.message.make_query("x.test", "A").to_wire()
    cache.remember(query, b"missing", query, 0.0)
    assert cache.replay(query, 0.0) is None
    key, _query, _reply = remembered(cache, "y.test", now=0.0)
    for index in range(5):
        spelled = dns.message.make_query("Y.TEST"[:index] + "y.test"[index:], "A").to_wire()
        entry = cache.get(key, 0.0)
        plain = parse_plain_query(spelled)
        cache.remember(
            spelled,
            key,
            render(entry, spelled, plain, now=0.0, udp_limit=1232, edns_udp_size=1232),
            0.0,
        )
    assert len(cache._rendered) <= 2
