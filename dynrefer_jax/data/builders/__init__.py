"""Readers of the public annotation formats (DATA_FORMATS.md) into raw region records.

Each `read_*` function returns (records, info) where records are the raw records of
`common.clean_split` and info holds the label vocabularies (categories, attribute names) and the
caption rules of that dataset. `tools/prepare_data.py` cleans and writes them.
"""
