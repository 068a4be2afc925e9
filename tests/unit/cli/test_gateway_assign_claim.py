"""``cpns gateway assign``: the claim code typed (D-003-10) and the empty code of a
re-assignment without the label (D-003-13)."""

from __future__ import annotations

import pytest

from cpns.cli.gateway_cmd import NO_LABEL_CODE, claim_key_of
from cpns.protocol.key_assignment import claim_key


def test_a_typed_code_gives_its_claim_key() -> None:
    """D-003-10: the typed code (any case, dashes optional) is the label's claim key."""
    assert claim_key_of("abcd-efgh-ijkl-mnop") == claim_key("ABCDEFGHIJKLMNOP")


@pytest.mark.parametrize("typed", ["", "   "])
def test_an_empty_code_stands_for_a_code_proving_no_label(typed: str) -> None:
    """D-003-13: no label at hand; the key of a code that proves nothing is sent (only a
    re-assignment of the user's own ratcheted PNE is accepted with it)."""
    assert claim_key_of(typed) == claim_key(NO_LABEL_CODE)


def test_a_malformed_code_is_refused() -> None:
    """D-003-10: a code that is not 16 base32 characters is a usage error."""
    with pytest.raises(ValueError, match="claim code"):
        claim_key_of("not-a-code")
