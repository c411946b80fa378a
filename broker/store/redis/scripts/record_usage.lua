-- record_usage: add one report to a usage row and list the row in its day, all or none.
--
-- KEYS
--   1    the day's row index (P:usage:{d:<day>})
--   2    the row (P:usage:{d:<day>}:<row>)
-- ARGV
--   1    the row (JSON key_id, account, model, principal), as listed in KEYS[1]
--   2    failed: 1 or 0
--   3    prompt tokens
--   4    completion tokens
--   5    cost
--   6    latency in ms
--   7    the latency bucket's field (b<i>)
-- Returns 1.
redis.call('HINCRBY', KEYS[2], 'requests', 1)
redis.call('HINCRBY', KEYS[2], 'failures', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'prompt_tokens', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'completion_tokens', ARGV[4])
redis.call('HINCRBYFLOAT', KEYS[2], 'cost', ARGV[5])
redis.call('HINCRBY', KEYS[2], 'latency_ms_sum', ARGV[6])
redis.call('HINCRBY', KEYS[2], ARGV[7], 1)
redis.call('SADD', KEYS[1], ARGV[1])
return 1
