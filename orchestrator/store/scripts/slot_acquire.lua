-- Take a slot on a provider key for job ARGV[1] if fewer jobs wait ahead of it than slots are free,
-- else join the key's line (scored ARGV[3]: priority, then submission time).
-- KEYS: 1 inflight set, 2 waiting line; ARGV: 1 job id, 2 cap, 3 score. Returns 1 when taken.
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
local free = tonumber(ARGV[2]) - redis.call('SCARD', KEYS[1])
if free > 0 then
  local ahead = redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. ARGV[3])
  if ahead < free then
    redis.call('SADD', KEYS[1], ARGV[1])
    redis.call('ZREM', KEYS[2], ARGV[1])
    return 1
  end
end
redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[1])
return 0
