//! The catalog: public model names → channels (plugin, base URL, credential), and the choice of
//! the channel and plugin that serve one request.
//!
//! The catalog is rebuilt from config when `config.yaml` changes and swapped atomically; a request
//! holds its `Route` (and through it its `Channel`) for its whole life.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{ChannelConfig, RoutesConfig, Secret};
use crate::plugins::{ChannelContext, Plugin, Registry};

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    UnknownModel(String),
    #[error("the provider plugin `{plugin}` serving model `{model}` is not loaded")]
    PluginNotLoaded { model: String, plugin: String },
    #[error(
        "the model `{0}` has no price: the operator must give it one (or mark it `free: true`)"
    )]
    Unpriced(String),
}

/// A configured upstream: a plugin, where it sends, and the credential the host adds.
#[derive(Debug)]
pub struct Channel {
    pub name: String,
    pub plugin: String,
    pub base_url: String,
    pub credential: Option<Secret>,
    pub options: Vec<(String, String)>,
}

/// One public model name and what serves it.
#[derive(Debug, Clone)]
pub struct Route {
    pub model: String,
    pub upstream_model: String,
    pub channel: Arc<Channel>,
    /// The configured price, if any (else the plugin manifest's).
    pub price: Option<crate::billing::Price>,
    /// Marked free in config: billed nothing.
    pub free: bool,
    /// Callable with no key (`auth.anonymous_models`): unbilled.
    pub anonymous: bool,
    /// How this model's prompts are counted for the estimate.
    pub tokenizer: crate::config::Tokenizer,
}

impl Route {
    /// The price billed for this model: the configured one, else nothing for a model marked
    /// free, else the one the serving plugin's manifest declares for the upstream model; `None`
    /// if none says (such a model is never billed as free: keyed calls to it are refused).
    pub fn price_with(&self, plugin: Option<&Plugin>) -> Option<crate::billing::Price> {
        if self.free {
            return Some(crate::billing::Price::default());
        }
        self.price
            .or_else(|| self.model_info(plugin?).and_then(|m| m.price))
    }

    /// What a plugin's manifest says about this route's upstream model.
    pub fn model_info<'p>(&self, plugin: &'p Plugin) -> Option<&'p crate::plugins::ModelInfo> {
        plugin
            .manifest
            .models
            .iter()
            .find(|m| m.id == self.upstream_model)
    }

    /// What the plugin is told about the channel: never the credential.
    pub fn context(&self) -> ChannelContext {
        ChannelContext {
            channel: self.channel.name.clone(),
            base_url: self.channel.base_url.clone(),
            model: self.upstream_model.clone(),
            options: self.channel.options.clone(),
        }
    }
}

/// The plugin chosen for a request, held for the request's whole life.
pub struct Pick {
    pub route: Route,
    pub plugin: Arc<Plugin>,
}

impl Pick {
    /// The model's price as billed (see [`Route::price_with`]).
    pub fn price(&self) -> Result<crate::billing::Price, RoutingError> {
        self.route
            .price_with(Some(&self.plugin))
            .ok_or_else(|| RoutingError::Unpriced(self.route.model.clone()))
    }

    /// What the plugin's manifest says about the upstream model.
    pub fn model_info(&self) -> Option<&crate::plugins::ModelInfo> {
        self.route.model_info(&self.plugin)
    }
}

#[derive(Debug, Default)]
struct Catalog {
    models: BTreeMap<String, Route>,
}

pub struct Routing {
    catalog: ArcSwap<Catalog>,
    plugins: Arc<Registry>,
}

impl Routing {
    pub fn new(routes: &RoutesConfig, plugins: Arc<Registry>) -> Self {
        Self {
            catalog: ArcSwap::from_pointee(build(routes)),
            plugins,
        }
    }

    /// Swap in a new set of channels and models.
    pub fn replace(&self, routes: &RoutesConfig) {
        self.catalog.store(Arc::new(build(routes)));
    }

    pub fn plugins(&self) -> &Arc<Registry> {
        &self.plugins
    }

    pub fn pick(&self, model: &str) -> Result<Pick, RoutingError> {
        let catalog = self.catalog.load();
        let route = catalog
            .models
            .get(model)
            .ok_or_else(|| RoutingError::UnknownModel(model.to_string()))?;
        let plugin = self.plugins.get(&route.channel.plugin).ok_or_else(|| {
            RoutingError::PluginNotLoaded {
                model: model.to_string(),
                plugin: route.channel.plugin.clone(),
            }
        })?;
        Ok(Pick {
            route: route.clone(),
            plugin,
        })
    }

    /// Models of `routes` that would be billed as free by accident: no configured price, not
    /// marked free, and a loaded plugin whose manifest has no price for the upstream model.
    /// (A model whose plugin is not loaded yet is checked when it is called.)
    pub fn unpriced(&self, routes: &RoutesConfig) -> Vec<String> {
        build(routes)
            .models
            .values()
            .filter(|r| {
                self.plugins
                    .get(&r.channel.plugin)
                    .is_some_and(|p| r.price_with(Some(&p)).is_none())
            })
            .map(|r| r.model.clone())
            .collect()
    }

    /// Every public model with the plugin that would serve it now (if loaded).
    pub fn models(&self) -> Vec<(Route, Option<Arc<Plugin>>)> {
        let catalog = self.catalog.load();
        catalog
            .models
            .values()
            .map(|r| (r.clone(), self.plugins.get(&r.channel.plugin)))
            .collect()
    }
}

fn build(routes: &RoutesConfig) -> Catalog {
    let channels: BTreeMap<&str, Arc<Channel>> = routes
        .channels
        .iter()
        .map(|c: &ChannelConfig| {
            (
                c.name.as_str(),
                Arc::new(Channel {
                    name: c.name.clone(),
                    plugin: c.plugin.clone(),
                    base_url: c.base_url.clone(),
                    credential: c.credential.clone(),
                    options: c
                        .options
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                }),
            )
        })
        .collect();
    let models = routes
        .models
        .iter()
        .filter_map(|m| {
            let channel = channels.get(m.channel.as_str())?.clone();
            Some((
                m.name.clone(),
                Route {
                    model: m.name.clone(),
                    upstream_model: m.upstream_model.clone(),
                    channel,
                    price: m.price,
                    free: m.free,
                    anonymous: routes.anonymous_models.contains(&m.name),
                    tokenizer: m.tokenizer,
                },
            ))
        })
        .collect();
    Catalog { models }
}
