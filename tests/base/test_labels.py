import numpy as np
import pytest

from ichpipe.base.labels import ANY_INDEX, LABELS, WEIGHTS, row_id, split_row_id


def test_competition_order_and_weights():
    assert LABELS == ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
    assert ANY_INDEX == 5
    np.testing.assert_array_equal(WEIGHTS, [1, 1, 1, 1, 1, 2])


def test_row_id_round_trip():
    assert row_id("ID_12cadc6af", "subdural") == "ID_12cadc6af_subdural"
    assert split_row_id("ID_12cadc6af_any") == ("ID_12cadc6af", "any")
    with pytest.raises(ValueError, match="row id"):
        split_row_id("ID_12cadc6af_bleed")
