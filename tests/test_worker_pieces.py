"""A take of many batched messages is worked through in pieces of bounded bytes."""

from types import SimpleNamespace

from enricher.stream.contract import content_type
from enricher.worker import _pieces


def events(sizes):
    return [SimpleNamespace(message=SimpleNamespace(value=b"x" * n)) for n in sizes]


def test_pieces_keep_order_cover_everything_and_stay_near_the_bound():
    evs = events([400, 400, 400, 1200, 10, 10, 10])
    pieces = list(_pieces(evs, 1000))
    assert [e for p in pieces for e in p] == evs
    assert [len(p) for p in pieces] == [3, 1, 3]


def test_a_single_oversized_message_is_a_piece_of_its_own():
    assert [len(p) for p in _pieces(events([5000, 1]), 1000)] == [1, 1]


def test_content_type_header_is_read_whatever_its_case():
    assert content_type([("Content-Type", b"application/vnd.apache.arrow.stream; x=1")]) == \
        "application/vnd.apache.arrow.stream"
    assert content_type([("other", b"x")]) is None and content_type(None) is None
