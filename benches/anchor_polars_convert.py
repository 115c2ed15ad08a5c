"""Python polars doing what `tunekit convert` does to an alpaca CSV (issue 17's anchor): read the CSV,
optionally run a SQL query over it (polars' SQLContext, the table named `data`, as `tunekit convert
--sql`), build each row's conversation with expressions (user = instruction, plus "\n" + input when
input is not empty; assistant = output; an id per row from its record number; rows with an empty
instruction or output dropped), write JSONL. Eager: polars' streaming sink_ndjson of the same plan
was slower here (8.4 s vs 4.1 s to write).

  python benches/anchor_polars_convert.py FILE.csv OUT.jsonl [QUERY]

Prints rows and seconds of the whole job (read, query, map, write), polars at its defaults (all threads).
"""
import sys, time
import polars as pl

src, out = sys.argv[1], sys.argv[2]
query = sys.argv[3] if len(sys.argv) > 3 else None
t = time.perf_counter()
df = pl.read_csv(src, infer_schema=False).with_row_index("row", offset=1)
if query:
    df = pl.SQLContext(data=df).execute(query).collect()
df = df.filter((pl.col("instruction") != "") & (pl.col("output") != ""))
user = pl.when(pl.col("input").fill_null("") == "").then(pl.col("instruction")).otherwise(
    pl.col("instruction") + "\n" + pl.col("input"))
messages = pl.concat_list([
    pl.struct(role=pl.lit("user"), content=user),
    pl.struct(role=pl.lit("assistant"), content=pl.col("output")),
]).alias("messages")
name = src.rsplit("/", 1)[-1] + ":"
df.select(messages, id=pl.lit(name) + pl.col("row").cast(pl.String)).write_ndjson(out)
print(f"polars rows={df.height} seconds={time.perf_counter() - t:.2f}")
