-- Free job ARGV[1]'s slot and return the waiting jobs that may now take one.
-- KEYS: 1 inflight set, 2 waiting line, 3 the line's fair-share tags (dropped with an empty line)
-- ARGV: 1 job id, 2 cap
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('ZCARD', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[3])
  return {}
end
local free = tonumber(ARGV[2]) - redis.call('SCARD', KEYS[1])
if free <= 0 then return {} end
return redis.call('ZRANGE', KEYS[2], 0, free - 1)
