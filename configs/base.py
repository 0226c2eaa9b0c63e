"""Every config key jaxlm knows, with its default, a one-line comment and the check its value must pass. Experiment
files derive from this."""

import ml_collections

from jaxlm.config_checks import (
  FREE,
  at_least,
  between,
  data_source,
  each,
  non_empty,
  one_of,
  positive,
  probability,
  rate,
  registered_task,
  satisfies,
)

# What each key accepts, declared on the line after the key: CHECKS["group.key"] = one_of(...) | at_least(n) |
# between(lo, hi) | positive() | probability() | rate() | non_empty() | each(check) | satisfies(predicate, words) |
# FREE (names, paths, globs). jaxlm/config.py checks every value against it, and against its default's type, once the
# config is loaded and overridden, before any work; the error names the key, the value and what the check expects.
# A boolean key needs no line (its type is its whole rule). tests/test_config_checks.py fails for a key without one.
CHECKS = {}


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"  # run name, shown in logs and written into checkpoint metadata
  CHECKS["name"] = FREE

  # ---- task ----------------------------------------------------------------------------------------------
  c.task = ml_collections.ConfigDict()
  c.task.name = "lm"  # lm | mlm_nsp | classification | ner | qa | relation | span_corruption | seq2seq | sft: jaxlm/tasks/
  CHECKS["task.name"] = registered_task()
  # encoder tasks (jaxlm/tasks/{classification,ner,qa,mlm_nsp}.py); labels and tag scheme: data.labels, data.tag_scheme
  # '' = the task's own; ner: softmax | crf; classification: sequence; qa: span; mlm_nsp: mlm_nsp | mlm;
  # relation: entity_start (the [E1] and [E2] marker states, concatenated)
  c.task.head = ""
  CHECKS["task.head"] = one_of("", "softmax", "crf", "sequence", "span", "mlm_nsp", "mlm", "entity_start")
  c.task.head_dropout = 0.1  # dropout on the encoder output before a classification / tagging head, in training
  CHECKS["task.head_dropout"] = rate()
  c.task.seqeval_strict = False  # ner: seqeval strict mode (entities follow data.tag_scheme); False = conlleval rules
  c.task.crf_constrained = True  # ner crf head, iob2 only: I-X never follows O or another type, nor starts a sentence
  c.task.max_answer_len = 30  # qa: longest answer, in tokens, the best-span search considers
  CHECKS["task.max_answer_len"] = at_least(1)
  # qa, SQuAD 2.0: a split with unanswerable questions is scored with the official v2.0 metrics (HasAns / NoAns, and
  # best_exact / best_f1 with the thresholds that reach them, best_f1_thresh); the null ([CLS]) span answers ''
  c.task.squad_v2 = False  # also `jaxlm predict` may answer '' (and eval uses the v2 metrics even with every answer)
  c.task.null_threshold = 0.0  # answer '' when the null score beats the best span's by more; a dev best_f1_thresh
  CHECKS["task.null_threshold"] = FREE
  c.task.mlm_max_predictions = 0  # mlm_nsp: vocabulary logits at most at this many masked positions per row; 0 = all
  CHECKS["task.mlm_max_predictions"] = at_least(0)
  # seq2seq (T5 fine-tuning on input -> target pairs; jaxlm/tasks/seq2seq.py):
  c.task.prefix = ""  # text put before every input (T5's task prefix), e.g. 'translate German to English: '
  CHECKS["task.prefix"] = FREE
  c.task.label_smoothing = 0.0  # share of each target's probability spread uniformly over the vocabulary, in training
  CHECKS["task.label_smoothing"] = rate()
  c.task.beam_size = 1  # generation on dev/test and in `jaxlm predict`: beams; 1 = greedy
  CHECKS["task.beam_size"] = at_least(1)
  c.task.length_penalty = 0.6  # beam search ranks log p / ((5 + length) / 6) ** length_penalty (0 = plain log p)
  CHECKS["task.length_penalty"] = at_least(0)
  c.task.no_repeat_ngram_size = 0  # generation on dev/test and in `jaxlm predict`: n > 0 never repeats an n-gram
  CHECKS["task.no_repeat_ngram_size"] = at_least(0)
  c.task.max_decode_len = 0  # tokens generated at most, EOS included; 0 = data.target_len (sft: sample.max_new_tokens)
  CHECKS["task.max_decode_len"] = at_least(0)
  # generated-text scores on dev/test (0-100): bleu chrf rouge1 rouge2 rougeL rougeLsum bleu1..4 distinct1..4;
  # empty = evaluation is loss/perplexity only (no generation)
  c.task.metrics = ("bleu", "chrf")
  CHECKS["task.metrics"] = each(one_of("bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu1", "bleu2",
                                       "bleu3", "bleu4", "distinct1", "distinct2", "distinct3", "distinct4"))
  c.task.lead_turns = 0  # also score the first N lines of each input as its output (LEAD-3 summaries: 3); 0 = off
  CHECKS["task.lead_turns"] = at_least(0)
  # dialogue inputs of 'Name: text' lines: the first N speakers' names become the pieces <speaker_1> .. <speaker_N>
  # in input and target, and outputs get the names back (a tokenizer trained by the run has the pieces); 0 = off
  c.task.speaker_tags = 0
  CHECKS["task.speaker_tags"] = at_least(0)
  c.task.report_examples = 5  # (input, reference, output) examples in each eval report (WORKDIR/report_*.txt)
  CHECKS["task.report_examples"] = at_least(0)

  # ---- initialisation from a pretrained checkpoint --------------------------------------------------------
  c.init = ml_collections.ConfigDict()
  c.init.hf_path = ""  # Hugging Face BERT dir (config.json, model.safetensors, vocab.txt) whose weights start training
  CHECKS["init.hf_path"] = FREE
  c.init.checkpoint_dir = ""  # jaxlm workdir or step dir whose params (matched by path and shape) start training
  CHECKS["init.checkpoint_dir"] = FREE
  c.init.peft_path = ""  # HF PEFT LoRA dir (adapter_config.json, adapter_model.safetensors) loaded onto the base
  CHECKS["init.peft_path"] = FREE

  # ---- model -------------------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.family = "decoder"  # decoder | encoder (BERT) | encoder_decoder (T5) — which model file builds the network
  CHECKS["model.family"] = one_of("decoder", "encoder", "encoder_decoder")
  c.model.style = "gpt2"  # decoder flavour: gpt2 (learned positions, LayerNorm, GELU, tied) | llama (RoPE, RMSNorm, SwiGLU, GQA)
  CHECKS["model.style"] = one_of("gpt2", "llama", "t5", "t5_v1_1")
  # encoder_decoder flavours: t5 (ReLU MLP, tied and rescaled output) | t5_v1_1 (gated GELU; set tie_embeddings=False)
  c.model.vocab_size = 1024  # must equal the tokenizer's vocabulary size (checked before training)
  CHECKS["model.vocab_size"] = at_least(1)
  c.model.max_len = 256  # longest sequence the model accepts (learned position table size / RoPE cache)
  CHECKS["model.max_len"] = at_least(1)
  c.model.num_layers = 2  # transformer blocks
  CHECKS["model.num_layers"] = at_least(1)
  c.model.d_model = 64  # residual stream width
  CHECKS["model.d_model"] = at_least(1)
  c.model.num_heads = 4  # query heads
  CHECKS["model.num_heads"] = at_least(1)
  c.model.num_kv_heads = 0  # key/value heads for grouped-query attention; 0 = same as num_heads
  CHECKS["model.num_kv_heads"] = at_least(0)
  c.model.head_dim = 0  # per-head width; 0 = d_model // num_heads
  CHECKS["model.head_dim"] = at_least(0)
  c.model.d_ff = 0  # MLP hidden width; 0 = 4*d_model (gpt2) or the Llama rule 8/3*d_model rounded to 64
  CHECKS["model.d_ff"] = at_least(0)
  c.model.tie_embeddings = True  # output projection reuses the token embedding (gpt2 default; llama sets False)
  c.model.norm_eps = 1e-5  # epsilon of LayerNorm / RMSNorm
  CHECKS["model.norm_eps"] = positive()
  c.model.rope_theta = 10000.0  # RoPE base frequency (llama style)
  CHECKS["model.rope_theta"] = positive()
  c.model.use_bias = True  # biases in dense layers (gpt2: True, llama: False)
  c.model.dropout = 0.0  # dropout rate on residual branches and embeddings during training
  CHECKS["model.dropout"] = rate()
  c.model.attention_dropout = 0.0  # encoder: dropout on attention probabilities in training (BERT's; unfused attention)
  CHECKS["model.attention_dropout"] = rate()
  c.model.init_std = 0.02  # stddev of the normal initialiser; output projections are scaled by 1/sqrt(2*layers)
  CHECKS["model.init_std"] = positive()
  c.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters always stay float32)
  CHECKS["model.dtype"] = one_of("float32", "bfloat16")
  c.model.frozen_dtype = "float32"  # frozen parameters' storage (peft, optim.frozen); trained ones stay float32
  CHECKS["model.frozen_dtype"] = one_of("float32", "bfloat16")
  c.model.remat = "none"  # rematerialisation per block: none | full | dots (save matmul outputs) | dots_no_batch
  CHECKS["model.remat"] = one_of("none", "full", "dots", "dots_no_batch")
  c.model.scan_layers = False  # jax.lax.scan over blocks (one compiled block, faster compile for deep models)
  # jax.nn.dot_product_attention implementation: xla | cudnn | None-equivalent 'auto'; decoders also take 'blocked':
  # the XLA form's numbers in 128-query blocks that skip the keys after each block (~10-18% faster steps on CPU)
  c.model.attention = "xla"
  CHECKS["model.attention"] = one_of("xla", "cudnn", "auto", "blocked")
  c.model.hidden_act = "gelu"  # encoder and gpt2-style MLP: gelu (exact erf, BERT) | gelu_tanh (tanh form, GPT-2)
  CHECKS["model.hidden_act"] = one_of("gelu", "gelu_tanh")
  # encoder (BERT) only:
  c.model.type_vocab_size = 2  # token-type (segment A/B) embeddings
  CHECKS["model.type_vocab_size"] = at_least(1)
  c.model.pooler = True  # tanh pooler over the first token, for sentence-level heads
  # encoder_decoder (T5) only; it also reads num_layers (the encoder's), head_dim (T5's d_kv), d_ff (0 = 4*d_model),
  # tie_embeddings, norm_eps (T5: 1e-6), dropout (T5: 0.1), dtype, remat, scan_layers, attention; it has no biases:
  c.model.num_decoder_layers = 0  # decoder blocks; 0 = model.num_layers
  CHECKS["model.num_decoder_layers"] = at_least(0)
  c.model.relative_attention_num_buckets = 32  # position buckets per stack: half exact distances, half log-spaced
  CHECKS["model.relative_attention_num_buckets"] = at_least(4)
  c.model.relative_attention_max_distance = 128  # key-query distances from this on share the last bucket
  CHECKS["model.relative_attention_max_distance"] = at_least(1)
  # dropout (model.dropout) on the MLP's hidden units too, as T5 does; False: only on residual branches and embeddings,
  # the Transformer paper's places (T5 steps ~8% faster on CPU, where the hidden units are the largest activation)
  c.model.mlp_dropout = True
  c.model.init_factor = 1.0  # T5's initializer_factor: multiplies every init stddev, which T5 derives from the shapes
  CHECKS["model.init_factor"] = positive()

  # ---- mesh and sharding -------------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # pure data-parallel replicas; -1 = the devices left after the other axes
  CHECKS["mesh.data"] = at_least(1).or_(-1)
  c.mesh.fsdp = 1  # parameter/optimizer sharding axis (ZeRO-3 style); batches are split over it too
  CHECKS["mesh.fsdp"] = at_least(1).or_(-1)
  c.mesh.tensor = 1  # tensor (model) parallel axis: heads and MLP hidden split across it
  CHECKS["mesh.tensor"] = at_least(1).or_(-1)
  # Multi-slice / multi-host (DCN) sizes. When any is above 1, mesh.data/fsdp/tensor are the sizes WITHIN one slice
  # (ICI; on GPUs: one host) and each mesh axis spans dcn_X * X devices; slices are the TPU slices, else the processes.
  c.mesh.dcn_data = 1  # data-parallel replicas across slices: the axis that tolerates slow links best
  CHECKS["mesh.dcn_data"] = at_least(1)
  c.mesh.dcn_fsdp = 1  # fsdp across slices: parameters gathered over DCN every step (large models only)
  CHECKS["mesh.dcn_fsdp"] = at_least(1)
  c.mesh.dcn_tensor = 1  # tensor parallelism across slices: almost never wise (per-layer collectives over DCN)
  CHECKS["mesh.dcn_tensor"] = at_least(1)
  # logical axis name -> mesh axes, resolved in jaxlm/sharding.py only. A name missing here is replicated.
  c.mesh.rules = (  # the logical-axis rules table, one (name, mesh axes) pair per line
      ("batch", ("data", "fsdp")),  # activations and input batches: split over every data-like axis
      ("vocab", "tensor"),  # embedding rows / logits columns
      ("embed", "fsdp"),  # the d_model dimension of weights: ZeRO-3 sharding
      ("mlp", "tensor"),  # MLP hidden units
      ("heads", "tensor"),  # query heads
      ("kv_heads", "tensor"),  # key/value heads
      ("head_dim", None),  # per-head width: never split
      ("length", None),  # sequence positions: not split (no sequence parallelism)
      ("layers", None),  # stacked-layer axis under scan_layers
      ("norm", None),  # norm scales and biases: replicated
  )
  CHECKS["mesh.rules"] = each(satisfies(lambda rule: len(rule) == 2 and isinstance(rule[0], str), "a (logical axis, mesh axes) pair"))

  # ---- data ----------------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  # Where records come from. text: .txt/.jsonl files | pydoc: CPython's bundled documentation text (no files needed)
  # | conll: token/tag files (ner) | tsv: TSV/CSV rows (classification) | squad: SQuAD JSON (qa)
  # | semeval: SemEval-2010 Task 8 files or .jsonl tagged sentences (relation; dev: a stratified data.eval_fraction)
  # | pairs: seq2seq (input, target) pairs: line-aligned files (gzip or not), .json/.jsonl/.tsv/.csv with named fields,
  # DailyDialog and SAMSum-style zips (per-split JSON) read in place
  # | chat: conversations (sft): .jsonl/.json messages or prompt/response fields, DailyDialog zips or dialogues_*.txt
  # | tfds: a public tfds dataset prepared as array_record. Local files are prepared once as array_record too.
  c.data.source = "text"
  CHECKS["data.source"] = data_source()
  c.data.train_files = ""  # glob(s) or folders of training files, comma-separated; relative to the working dir
  CHECKS["data.train_files"] = FREE
  c.data.eval_files = ""  # glob(s) for evaluation; empty = hold out data.eval_fraction of the train records
  CHECKS["data.eval_files"] = FREE
  c.data.dev_files = ""  # fine-tuning: glob(s) of the dev split (evaluated during training); empty = data.eval_files
  CHECKS["data.dev_files"] = FREE
  c.data.test_files = ""  # fine-tuning: glob(s) of the test split, evaluated once at the end with the best checkpoint
  CHECKS["data.test_files"] = FREE
  c.data.eval_fraction = 0.05  # share of records held out for eval when there is no eval split (seed-independent)
  CHECKS["data.eval_fraction"] = between(0, 1, hi_open=True)
  c.data.jsonl_field = "text"  # field holding the text in .jsonl files and in tfds text datasets (wikipedia, c4)
  CHECKS["data.jsonl_field"] = non_empty()
  c.data.doc_split = "blank_lines"  # how a file splits into documents: blank_lines | lines | file
  CHECKS["data.doc_split"] = one_of("blank_lines", "lines", "file")
  c.data.add_pydoc = False  # data.source='text': the pydoc topics join the train split of the files (more text)
  c.data.tfds_name = ""  # data.source=tfds: dataset[/config], e.g. glue/sst2, conll2003, squad, wikipedia/20230601.en
  CHECKS["data.tfds_name"] = FREE
  c.data.tfds_data_dir = ""  # tfds datasets and prepared local files; empty = $TFDS_DATA_DIR or ~/tensorflow_datasets
  CHECKS["data.tfds_data_dir"] = FREE
  c.data.tfds_train_split = "train"  # tfds split for training; slices work ('train[:90%]')
  CHECKS["data.tfds_train_split"] = non_empty()
  c.data.tfds_eval_split = "validation"  # tfds split for eval; empty = hold out data.eval_fraction of the train split
  CHECKS["data.tfds_eval_split"] = FREE
  c.data.tfds_test_split = ""  # tfds split evaluated at the end of fine-tuning (e.g. 'test'); empty = none
  CHECKS["data.tfds_test_split"] = FREE
  c.data.text_fields = "sentence"  # classification: text column, or two comma-separated (a pair); indices if no header
  CHECKS["data.text_fields"] = non_empty()
  c.data.label_field = "label"  # classification: the label column (an index without a header)
  CHECKS["data.label_field"] = non_empty()
  c.data.tsv_header = True  # tsv: the first row names the columns
  c.data.tsv_delimiter = "\t"  # tsv: column separator; "," reads CSV with standard quoting
  CHECKS["data.tsv_delimiter"] = satisfies(lambda d: len(d) == 1, "a single character")
  c.data.tokens_field = "tokens"  # ner from tfds: the field holding a sentence's words
  CHECKS["data.tokens_field"] = non_empty()
  c.data.tags_field = "ner"  # ner from tfds: the field holding their tags
  CHECKS["data.tags_field"] = non_empty()
  c.data.conll_tag_column = -1  # ner from CoNLL files: the column holding the tag (-1 = last)
  CHECKS["data.conll_tag_column"] = FREE
  c.data.tag_scheme = "iob2"  # ner: iob1 | iob2 | bioes; every tag sequence is validated against it
  CHECKS["data.tag_scheme"] = one_of("iob1", "iob2", "bioes")
  c.data.labels = ()  # label names in id order (class labels or tags); empty = sorted from the train split, 'O' first
  CHECKS["data.labels"] = each(non_empty())
  c.data.seq_len = 64  # tokens per sequence (packed LM rows; encoder inputs incl. [CLS]/[SEP]; T5 encoder inputs)
  CHECKS["data.seq_len"] = at_least(1)
  c.data.bucket_lengths = ()  # fine-tuning: pad a batch to the smallest of these that fits it (seq_len comes last)
  CHECKS["data.bucket_lengths"] = each(at_least(1))
  c.data.length_group_batches = 0  # fine-tuning train: sort this many batches' rows by length, batch, shuffle; 0 = off
  CHECKS["data.length_group_batches"] = at_least(0)
  c.data.packing = "first_fit"  # first_fit (a document is cut only if longer than seq_len) | concat (concat-and-split)
  CHECKS["data.packing"] = one_of("first_fit", "concat")
  c.data.pack_bins = 32  # first_fit: rows filled at once; more = less padding, but documents wait longer to be emitted
  CHECKS["data.pack_bins"] = at_least(1)
  # classification, ner, relation: first-fit pack whole examples (over data.pack_bins open rows) into rows of seq_len,
  # with segment ids and per-example positions; train.batch_size then counts rows, each holding several examples
  c.data.pack_examples = False
  c.data.pack_max_examples = 16  # packed rows: examples a row at most (per-example arrays [rows, this]); <= seq_len/2
  CHECKS["data.pack_max_examples"] = at_least(1)
  c.data.add_eos = True  # append the tokenizer's EOS id to each document
  c.data.mlm_probability = 0.15  # mlm_nsp: share of tokens to predict; of those 80% become [MASK], 10% random, 10% kept
  CHECKS["data.mlm_probability"] = probability()
  c.data.whole_word_mask = False  # mlm_nsp: mask every piece of a chosen word together
  c.data.nsp_probability = 0.5  # mlm_nsp: share of pairs whose second segment comes from another document; 0 = no NSP
  CHECKS["data.nsp_probability"] = probability()
  c.data.short_seq_probability = 0.1  # mlm_nsp: share of examples built shorter than seq_len, as fine-tuning inputs are
  CHECKS["data.short_seq_probability"] = probability()
  c.data.noise_density = 0.15  # span_corruption: share of tokens replaced by sentinel spans
  CHECKS["data.noise_density"] = between(0, 1, lo_open=True, hi_open=True)
  c.data.mean_noise_span_length = 3.0  # span_corruption: average span length
  CHECKS["data.mean_noise_span_length"] = at_least(1)
  c.data.doc_stride = 128  # qa: tokens between the starts of consecutive windows over a long context
  CHECKS["data.doc_stride"] = at_least(1)
  c.data.source_lang = ""  # pairs from line-aligned files: the input side's name part ('de': train.de.gz; name these)
  CHECKS["data.source_lang"] = FREE
  c.data.target_lang = ""  # ... and the target side's ('en': train.de.gz pairs with train.en.gz, line by line)
  CHECKS["data.target_lang"] = FREE
  c.data.input_field = "source"  # pairs from JSON/JSONL/TSV/CSV (a column index without a header) or tfds: input field
  CHECKS["data.input_field"] = non_empty()
  c.data.target_field = "target"  # ... and the target field (SAMSum: dialogue -> summary)
  CHECKS["data.target_field"] = non_empty()
  c.data.context_turns = 3  # pairs from dialogues (DailyDialog): turns before a response that form its input; 0 = all
  CHECKS["data.context_turns"] = at_least(0)
  c.data.turn_separator = " | "  # between those turns in the input
  CHECKS["data.turn_separator"] = FREE
  c.data.drop_duplicates = False  # pairs: leave out a pair whose input and target repeat an earlier one of its file
  c.data.target_len = 0  # seq2seq: decoder tokens per row (target + EOS, cut to fit); 0 = data.seq_len
  CHECKS["data.target_len"] = at_least(0)
  c.data.pack_pairs = True  # seq2seq train rows: first-fit pack pairs (segment ids on both sides); False = one a row
  c.data.max_query_length = 64  # qa: question tokens kept
  CHECKS["data.max_query_length"] = at_least(1)
  # ner: a sentence longer than a row is tagged in overlapping windows whose starts are this many sub-words apart
  c.data.ner_stride = 0  # 0 = half a window (data.seq_len - 2 sub-words): every word lies near some window's centre
  CHECKS["data.ner_stride"] = at_least(0)
  # chat (sft; jaxlm/data/chat.py): a conversation is a JSON object with a list of {role, content} messages (roles
  # system | user | assistant), or one exchange from prompt / response fields (and an optional system field)
  c.data.messages_field = "messages"  # chat: the field holding the list of messages
  CHECKS["data.messages_field"] = non_empty()
  c.data.prompt_field = "prompt"  # chat: ... else the field holding the user's prompt
  CHECKS["data.prompt_field"] = non_empty()
  c.data.response_field = "response"  # chat: ... and the assistant's response (optional in `jaxlm generate --chat`)
  CHECKS["data.response_field"] = non_empty()
  c.data.system_field = "system"  # chat: ... and an optional system message
  CHECKS["data.system_field"] = non_empty()
  c.data.assistant_speaker = "second"  # chat from DailyDialog: the speaker who is the assistant: first | second | both
  CHECKS["data.assistant_speaker"] = one_of("first", "second", "both")  # both: each dialogue twice, once per speaker
  # The chat template: each message is its role's marker, its content, then chat_end; a reply is asked for with
  # chat_assistant. A marker that is one vocabulary piece (the whitespace around it aside) is that one token: train
  # the tokenizer with tokenizer.user_defined_symbols=('<|system|>', '<|user|>', '<|assistant|>', '<|end|>').
  c.data.chat_system = "<|system|>\n"  # before a system message
  CHECKS["data.chat_system"] = non_empty()
  c.data.chat_user = "<|user|>\n"  # before a user message
  CHECKS["data.chat_user"] = non_empty()
  c.data.chat_assistant = "<|assistant|>\n"  # before an assistant message
  CHECKS["data.chat_assistant"] = non_empty()
  # ends every message; must be one token: the loss covers the assistant's (so it learns to stop), generation stops at it
  c.data.chat_end = "<|end|>\n"
  CHECKS["data.chat_end"] = non_empty()
  c.data.shuffle = True  # globally shuffle examples each epoch
  c.data.num_epochs = 0  # 0 = repeat forever (training stops at train.steps)
  CHECKS["data.num_epochs"] = at_least(0)
  c.data.worker_count = 0  # grain worker processes tokenising records and noising train rows; 0 = main process
  CHECKS["data.worker_count"] = at_least(0)
  c.data.read_threads = 0  # threads reading records ahead in each process/worker; >0 only for slow (remote) storage
  CHECKS["data.read_threads"] = at_least(0)
  c.data.worker_buffer_size = 2  # batches each worker prepares ahead
  CHECKS["data.worker_buffer_size"] = at_least(1)
  c.data.prefetch = 2  # batches a background thread prepares ahead where no workers make them
  CHECKS["data.prefetch"] = at_least(0)

  # ---- tokenizer -----------------------------------------------------------------------------------------
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ""  # sentencepiece .model file or WordPiece vocab.txt; empty = WORKDIR/tokenizer/spm.model
  CHECKS["tokenizer.path"] = FREE
  c.tokenizer.kind = "sentencepiece"  # sentencepiece | wordpiece
  CHECKS["tokenizer.kind"] = one_of("sentencepiece", "wordpiece")
  c.tokenizer.vocab_size = 1024  # vocabulary size when training a sentencepiece model
  CHECKS["tokenizer.vocab_size"] = at_least(1)
  c.tokenizer.model_type = "unigram"  # sentencepiece algorithm: unigram | bpe
  CHECKS["tokenizer.model_type"] = one_of("unigram", "bpe")
  c.tokenizer.character_coverage = 1.0  # share of characters covered (0.9995 for large CJK alphabets)
  CHECKS["tokenizer.character_coverage"] = between(0, 1, lo_open=True)
  c.tokenizer.user_defined_symbols = ()  # extra special tokens kept whole, e.g. ('[CLS]', '[SEP]', '[MASK]')
  CHECKS["tokenizer.user_defined_symbols"] = each(non_empty())
  c.tokenizer.max_sentences = 200000  # sentences sampled from the corpus for training the model
  CHECKS["tokenizer.max_sentences"] = at_least(1)
  c.tokenizer.num_sentinels = 0  # T5 span corruption: also add <extra_id_0> .. <extra_id_{N-1}> as special tokens
  CHECKS["tokenizer.num_sentinels"] = at_least(0)
  c.tokenizer.lowercase = False  # wordpiece: lower-case and strip accents (uncased BERT)

  # ---- optimiser -----------------------------------------------------------------------------------------
  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"  # adamw | adafactor (T5's: factored second moments, updates scaled by each tensor's RMS)
  CHECKS["optim.name"] = one_of("adamw", "adafactor")
  c.optim.learning_rate = 3e-4  # peak learning rate
  CHECKS["optim.learning_rate"] = at_least(0)
  c.optim.schedule = "cosine"  # decay after warmup: cosine | linear | constant | rsqrt (peak * sqrt(warmup / step))
  CHECKS["optim.schedule"] = one_of("cosine", "linear", "constant", "rsqrt")
  c.optim.warmup_steps = 100  # linear warmup from 0 to the peak
  CHECKS["optim.warmup_steps"] = at_least(0)
  c.optim.end_lr_fraction = 0.1  # final learning rate as a fraction of the peak
  CHECKS["optim.end_lr_fraction"] = probability()
  c.optim.cooldown_fraction = 0.0  # last fraction of train.steps: the rate ramps linearly to ~0 (any schedule)
  CHECKS["optim.cooldown_fraction"] = probability()
  c.optim.b1 = 0.9  # AdamW beta1 (adafactor keeps no first moment, as T5 trained)
  CHECKS["optim.b1"] = between(0, 1, hi_open=True)
  c.optim.b2 = 0.95  # AdamW beta2 (adafactor's second-moment decay follows step**-0.8 instead)
  CHECKS["optim.b2"] = between(0, 1, hi_open=True)
  c.optim.eps = 1e-8  # AdamW epsilon (adafactor: its own 1e-30)
  CHECKS["optim.eps"] = positive()
  c.optim.weight_decay = 0.1  # decoupled weight decay, applied to matrices only (see decay_embeddings)
  CHECKS["optim.weight_decay"] = at_least(0)
  c.optim.decay_embeddings = True  # also decay token/position embedding tables (norms and biases never)
  c.optim.grad_clip = 1.0  # global-norm gradient clipping; 0 disables
  CHECKS["optim.grad_clip"] = at_least(0)
  c.optim.grad_accum_steps = 1  # micro-batches per optimiser step; train.batch_size is split into this many
  CHECKS["optim.grad_accum_steps"] = at_least(1)
  c.optim.z_loss = 0.0  # weight of the z-loss (log-partition squared) that keeps logits from drifting
  CHECKS["optim.z_loss"] = at_least(0)
  # Freezing: regexes searched in parameter paths ('encoder/blocks_0/attn/qkv'; 'blocks/block/...' under scan_layers).
  c.optim.trainable = ""  # train only these (+ the task head; with peft.method=lora: + adapters), e.g. '^classifier/'
  CHECKS["optim.trainable"] = FREE
  c.optim.frozen = ""  # never train these, whatever else says so, e.g. 'embeddings|blocks_[0-2]/' (lower 3 layers)
  CHECKS["optim.frozen"] = FREE

  # ---- parameter-efficient fine-tuning (jaxlm/peft.py) ---------------------------------------------------------
  # LoRA: each targeted projection y = x W becomes x W + (alpha / rank) * dropout(x) A B with A [in, rank] and
  # B [rank, out] (B starts at zero); W is frozen. Adapters, the task head and optim.trainable's matches train.
  c.peft = ml_collections.ConfigDict()
  c.peft.method = "none"  # none | lora
  CHECKS["peft.method"] = one_of("none", "lora")
  c.peft.rank = 8  # r: the adapters' inner width; trained parameters per projection = r * (inputs + outputs)
  CHECKS["peft.rank"] = at_least(1)
  c.peft.alpha = 16.0  # the adapters' output is scaled by alpha / rank (so changing rank keeps the learning rate)
  CHECKS["peft.alpha"] = positive()
  c.peft.dropout = 0.0  # dropout on each adapter's input, in training
  CHECKS["peft.dropout"] = rate()
  c.peft.targets = "attn/(qkv|q|kv|k|v|o)$|mlp/(wi|wi_0|wi_1|wo)$"  # regex over projection paths that get adapters
  CHECKS["peft.targets"] = FREE
  # decoders: token ids whose embedding row (and output row) train beside the adapters, as deltas on the frozen ones
  # (PEFT's trainable_token_indices), e.g. chat markers a pretrained model never saw; `jaxlm export --merge` folds them
  c.peft.trainable_token_ids = ()
  CHECKS["peft.trainable_token_ids"] = each(at_least(0))

  # ---- training ------------------------------------------------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000  # optimiser steps to train for (the run ends at this step)
  CHECKS["train.steps"] = at_least(1)
  # a budget of training seconds (train_seconds: evaluation excluded, resumes included): the run ends at the last log
  # row before one more log interval would pass it, as if train.steps were that step (dev, ranked save, test); 0 = none
  c.train.time_limit_s = 0.0
  CHECKS["train.time_limit_s"] = at_least(0)
  c.train.batch_size = 8  # global batch size in sequences, across all devices and processes
  CHECKS["train.batch_size"] = at_least(1)
  c.train.seed = 0  # seeds parameter init, dropout and data order
  CHECKS["train.seed"] = at_least(0)
  c.train.log_every = 10  # steps between train metric rows in metrics.jsonl / TensorBoard
  CHECKS["train.log_every"] = at_least(1)
  c.train.eval_every = 100  # steps between evaluations; 0 = only at the end
  CHECKS["train.eval_every"] = at_least(0)
  c.train.eval_each_epoch = False  # fine-tuning: evaluate on dev every epoch of the train split instead of eval_every
  c.train.eval_batches = 8  # batches per evaluation (0 = the whole eval split)
  CHECKS["train.eval_batches"] = at_least(0)
  # progress on stderr (process 0 only): a tqdm bar on a terminal; where stderr is not one (CI, nohup, SLURM logs),
  # plain lines instead of the bar's carriage returns. False: a log line on stdout at every train row instead
  c.train.progress_bar = True
  c.train.progress_every = 100  # stderr not a terminal: steps between those plain lines (0 = at every train row)
  CHECKS["train.progress_every"] = at_least(0)
  c.train.profile = ""  # "START:STOP": a jax.profiler trace of steps START..STOP-1 in WORKDIR/profile; "" = none
  CHECKS["train.profile"] = satisfies(lambda v: v == "" or (len(v.split(":")) == 2 and all(
      p.strip().isdigit() for p in v.split(":")) and int(v.split(":")[0]) < int(v.split(":")[1])), "'' or START:STOP "
      "with START < STOP, e.g. 10:15")
  c.train.nonfinite = "skip"  # NaN/Inf loss or grad norm: skip (keep params, count it) | stop (keep last good checkpoint)
  CHECKS["train.nonfinite"] = one_of("skip", "stop")
  # train.nonfinite='skip' stops the run (exit 1) past either limit; checkpoints wait for a step that updates, so the
  # newest one predates the run of skips that ended training. 0 = no limit.
  c.train.max_consecutive_nonfinite_skips = 20  # skipped updates in a row: a diverged run skips every step
  CHECKS["train.max_consecutive_nonfinite_skips"] = at_least(0)
  c.train.max_nonfinite_skips = 0  # skipped updates over the whole run (resumes included)
  CHECKS["train.max_nonfinite_skips"] = at_least(0)

  # ---- checkpoints ---------------------------------------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500  # steps between checkpoints (a final one is always written)
  CHECKS["checkpoint.every_steps"] = at_least(1)
  c.checkpoint.keep = 3  # keep the newest N checkpoints
  CHECKS["checkpoint.keep"] = at_least(0)
  c.checkpoint.keep_every = 0  # additionally keep every K-th step forever; 0 = off
  CHECKS["checkpoint.keep_every"] = at_least(0)
  c.checkpoint.async_save = True  # write in the background while training continues
  c.checkpoint.compress = False  # zstd on arrays: ~10% smaller on disk, several times slower to write and read
  c.checkpoint.best_metric = ""  # fine-tuning: also keep the keep_best steps best by this eval metric; empty = off
  CHECKS["checkpoint.best_metric"] = FREE
  c.checkpoint.best_mode = "max"  # max | min: whether a larger or a smaller best_metric is better
  CHECKS["checkpoint.best_mode"] = one_of("max", "min")
  c.checkpoint.keep_best = 1  # how many best-by-metric checkpoints to keep beside the newest `keep`
  CHECKS["checkpoint.keep_best"] = at_least(1)
  c.checkpoint.save_frozen = False  # False: frozen params that init.* gave are left out (a reference + fingerprint)

  # ---- multi-process start-up (jaxlm/distributed.py: JAXLM_* variables, SLURM or Cloud TPU) ---------------------
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialization_timeout_s = 300  # every process waits this long for all the others to join, then fails
  CHECKS["distributed.initialization_timeout_s"] = at_least(1)
  c.distributed.heartbeat_timeout_s = 100  # a process silent this long is declared dead; the others stop with an error
  CHECKS["distributed.heartbeat_timeout_s"] = at_least(1)
  c.distributed.shutdown_timeout_s = 300  # at exit, how long a process waits for the others to finish too
  CHECKS["distributed.shutdown_timeout_s"] = at_least(1)

  # ---- sampling (jaxlm generate) -------------------------------------------------------------------------
  c.sample = ml_collections.ConfigDict()
  c.sample.max_new_tokens = 64  # tokens generated after the prompt
  CHECKS["sample.max_new_tokens"] = at_least(1)
  c.sample.temperature = 0.8  # 0 = greedy
  CHECKS["sample.temperature"] = at_least(0)
  c.sample.top_k = 40  # 0 = no top-k filter
  CHECKS["sample.top_k"] = at_least(0)
  c.sample.top_p = 1.0  # nucleus sampling: keep the most likely tokens up to this probability mass; 1 = all
  CHECKS["sample.top_p"] = between(0, 1, lo_open=True)
  c.sample.beam_size = 1  # > 1: beam search instead of sampling (temperature, top_k, top_p unused)
  CHECKS["sample.beam_size"] = at_least(1)
  c.sample.length_penalty = 0.6  # beam search: alpha of ((5 + length) / 6) ** alpha
  CHECKS["sample.length_penalty"] = at_least(0)
  c.sample.no_repeat_ngram_size = 0  # n > 0: no n-gram twice in the generated tokens (sampling and beam search)
  CHECKS["sample.no_repeat_ngram_size"] = at_least(0)
  c.sample.seed = 0  # sampling RNG seed
  CHECKS["sample.seed"] = at_least(0)

  return c
