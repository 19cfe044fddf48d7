-- A provider's Retry-After: push the key's TAT forward (never back) so nothing goes before it.
-- KEYS: 1 rate; ARGV: 1 target TAT (ms), 2 expiry (ms)
local target = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if target > tat then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
