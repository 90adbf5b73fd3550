/*
 * npz.h: pg_llm's checkpoint file format, the one description of it.
 *
 * A file is a gzip stream (one member or several, concatenated) of records
 *
 *     [uint16 LE name length][UTF-8 name][a .npy v1.0 or v2.0 array]
 *
 * in this order:
 *   NPZ_FORMAT_NAME  an int64 array of 1 value, the format version (NPZ_FORMAT_VERSION when
 *                    written): marks the file as pg_llm's and says how to read the rest
 *   NPZ_CONFIG_NAME  an int64 (or int32) array of 5 values [n_layer, n_head, d_model, n_positions,
 *                    vocab], with which a file registers its own architecture
 *   NPZ_VOCAB_NAME, NPZ_MERGES_NAME  (optional, both or neither) the model's tokenizer: the bytes
 *                    of vocab.json and merges.txt as uint8 arrays ('|u1'), which an import loads
 *                    as the model's tokenizer after its weights
 *   the tensors      float32 little-endian ('<f4'), C order, named and shaped as tensors.def says
 *
 * Versions: 3 (pg_llm 0.3.0) added the tokenizer records; 2 (pg_llm 0.2.0) the format record.
 * Files without it still import: format 1
 * (pg_llm 0.1.0) starts with the configuration record, and the seed's files carry only tensors
 * (their model must then be registered first). A file of a newer format is refused by name.
 *
 * npz.c reads and writes this format in the server; pgllm/npz.py writes it (pgllm convert, pgllm
 * export) and reads it. pgllm/npz.py takes the NPZ_ definitions below from this file, so keep each
 * one on its own line with a plain string or a decimal number.
 */
#ifndef PG_LLM_NPZ_H
#define PG_LLM_NPZ_H

#define NPZ_FORMAT_NAME "__pgllm_format__"
#define NPZ_FORMAT_VERSION 3
#define NPZ_CONFIG_NAME "__config__"
#define NPZ_VOCAB_NAME "__tokenizer_vocab__"
#define NPZ_MERGES_NAME "__tokenizer_merges__"
#define NPZ_NAME_MAX 1024			/* longest record name accepted (real ones are < 64 bytes) */
#define NPZ_HEADER_MAX 16384		/* longest .npy header accepted (numpy writes 128 bytes here) */
#define NPZ_MAX_DIMS 8
#define NPZ_GZIP_BLOCK 4194304		/* writers: bytes per gzip member (4 MB), made in parallel */

#endif							/* PG_LLM_NPZ_H */
