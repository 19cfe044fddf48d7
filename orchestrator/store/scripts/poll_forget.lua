-- Drop a job's pending poll. KEYS: 1 due, 2 ready, 3 meta; ARGV: 1 job id
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
