"""The content-type header of a message is read whatever its case."""

from enricher.stream.contract import content_type


def test_content_type_header_is_read_whatever_its_case():
    assert content_type([("Content-Type", b"application/vnd.apache.arrow.stream; x=1")]) == \
        "application/vnd.apache.arrow.stream"
    assert content_type([("other", b"x")]) is None and content_type(None) is None
